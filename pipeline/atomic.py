"""Write to a temporary path, then rename: a file or directory appears whole or not at all.

Every output that marks work as done (a table file, a card, a checkpoint, a built asset) is
written through :func:`atomic_path`. The temporary path sits beside the final one (a rename
within one filesystem is atomic) and is named ``.<final name>.<pid>.tmp``: hidden from the
readers of the final names, and never shared by two attempts at the same output. A killed
attempt leaves its temporary behind; :func:`remove_leftovers` deletes those.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
    propagates; ``final`` is left as it was. An existing directory ``final`` is replaced whole
    (moved aside, then deleted: a directory cannot be renamed over a non-empty one).
    """
    final = Path(final)
    tmp = temporary_path(final)
    _remove(tmp)  # an earlier attempt under the same (reused) pid
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if directory and final.is_dir():
        old = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
        _remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that it appears complete or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
