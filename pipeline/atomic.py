"""Write to a temporary path, then rename: a file or directory appears whole or not at all.

Every output that marks work as done (a table file, a card, a checkpoint, a built asset) is
written through :func:`atomic_path`. The temporary path sits beside the final one (a rename
within one filesystem is atomic) and is named ``.<final name>.<pid>.tmp``: hidden from the
readers of the final names, and never shared by two attempts at the same output. A killed
attempt leaves its temporary behind; :func:`remove_leftovers` deletes those.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import SipError

# The OS errors that mean the output location itself refuses the write (not a bug in sip).
_REFUSED = {errno.ENOSPC: "no space left on its filesystem", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "its filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}


class OutputNotWritable(SipError, OSError):
    """An output could not be written where the manifest puts it (a full disk, a quota, a
    read-only filesystem, no permission); nothing half-written was left in its place."""


def refused_write(exc: BaseException, path: str | Path) -> OutputNotWritable | None:
    """The error to raise instead of ``exc`` when ``exc`` means ``path``'s location refuses
    writes, naming the path, why, the space left and what to do; None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in _REFUSED or isinstance(exc, OutputNotWritable):
        return None
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), path)
    try:
        free = shutil.disk_usage(where).free
        room = f"{free / 2**20:,.1f} MiB free there"
    except OSError:
        room = "free space unknown"
    return OutputNotWritable(f"cannot write {path}: {_REFUSED[exc.errno]} ({room}). No half-written file took an "
                             "output's name; free space or make the directory writable (or set run.output_dir "
                             "elsewhere) and re-run: finished work is kept and resumed")


def temporary_path(final: str | Path) -> Path:
    """Where this process writes ``final`` before renaming it into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path to write ``final`` to; renamed over ``final`` when the block succeeds.

    Args:
        final: the file or directory to produce. Its parent must exist.
        directory: True to get an empty directory to fill; False to get a file path that does
            not exist yet (write it yourself).

    Yields:
        The temporary path (``.<name>.<pid>.tmp`` beside ``final``).

    On an exception (or a KeyboardInterrupt) the temporary is removed and the exception
    propagates; ``final`` is left as it was. A write the location refuses (full disk, quota,
    read-only filesystem, permission) is raised as :class:`OutputNotWritable`, naming ``final``. An existing directory ``final`` is replaced whole
    (moved aside, then deleted: a directory cannot be renamed over a non-empty one).
    """
    final = Path(final)
    tmp = temporary_path(final)
    try:
        _remove(tmp)  # an earlier attempt under the same (reused) pid
        if directory:
            tmp.mkdir()
    except OSError as exc:
        raise (refused_write(exc, final) or exc) from exc
    try:
        yield tmp
    except BaseException as exc:
        _remove(tmp)
        if (refused := refused_write(exc, final)) is not None:
            raise refused from exc
        raise
    try:
        if directory and final.is_dir():
            old = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise (refused_write(exc, final) or exc) from exc


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that it appears complete or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_leftovers_under(directory: str | Path) -> list[Path]:
    """Delete every temporary (``.<name>.<pid>.tmp``) under ``directory``: what the writers of a
    failed run left when they were stopped. Only when none of them is still running."""
    stale = sorted(Path(directory).rglob(".*.tmp")) if Path(directory).is_dir() else []
    for path in stale:
        _remove(path)
    return stale


def remove_leftovers(final: str | Path) -> list[Path]:
    """Delete the temporaries that killed attempts at ``final`` left behind (any pid).

    Args:
        final: the final path; its name may be a glob pattern (``checkpoints/step-*``) to clear
            the leftovers of every output of that kind in the directory.

    Returns:
        The paths removed, sorted.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    stale = sorted(final.parent.glob(f".{final.name}.*.tmp"))
    for path in stale:
        _remove(path)
    return stale
