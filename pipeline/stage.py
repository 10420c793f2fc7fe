"""What every batch stage shares: its output directory, the resume guard, stats and the card.

Layout of a stage directory (the filesystem is the API)::

    <output_dir>/<stage>/
        00000.parquet ...     the table, one file per task (written atomically)
        card.json, README.md  the dataset card, written when every task has finished
        manifest.yaml         the manifest that made it
        _stage.json           the settings that decide its contents (the resume guard)
        _logs/                datatrove's logging dir: completions/, logs/, stats/, slurm_logs/
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.atomic import refused_write, write_text_atomic
from pipeline.errors import SipError
from pipeline.manifest import Manifest, diff_views, fingerprint, hash_view

SETTINGS_FILE = "_stage.json"  # the settings a stage directory was made with (the resume guard)


class StageFailed(SipError, RuntimeError):
    """Some tasks of a stage did not finish."""


class StageConflict(SipError, RuntimeError):
    """An output directory made with different settings; re-run with --force to start over."""


def stored_settings(directory: Path) -> dict | None:
    """What a stage directory was made with (its ``_stage.json``: stage, view, layout, ...), or
    None where there is none."""
    state_file = Path(directory) / SETTINGS_FILE
    return json.loads(state_file.read_text()) if state_file.is_file() else None


def older_file_layout(directory: Path) -> bool:
    """Whether a stage directory was written with another file layout than
    :data:`pipeline.io.UNIT_LAYOUT`'s (files named by task, not by unit): later stages cannot
    find a unit's rows in it by name."""
    from pipeline.io import UNIT_LAYOUT

    old = stored_settings(directory)
    return old is not None and old.get("layout", {}).get("files") != UNIT_LAYOUT["files"]


def require_each_key_once(path: Path, columns: list[str], expected: set[tuple], what: str) -> None:
    """A finished stage's table at ``path`` holds every key of ``expected`` (tuples of the values
    of ``columns``) exactly once, and no other key.

    Raises:
        StageFailed: naming ``what`` the rows should be, how many are repeated and missing.
    """
    from pipeline.io import read_table

    table = read_table(path, columns=columns)
    keys = list(zip(*(table.column(c).to_pylist() for c in columns)))
    found = set(keys)
    if len(keys) != len(found) or found != expected:
        raise StageFailed(f"{path}: {len(keys)} rows ({len(keys) - len(found)} repeated ({', '.join(columns)}), "
                          f"{len(expected - found)} missing, {len(found - expected)} unexpected) for {what}; every "
                          "key must appear exactly once")


def require_unit_keys(path: Path, pairs_dir: Path, columns: list[str], keys_of: Callable[[list[str]], set[tuple]],
                      what: str, *, once: bool = True) -> None:
    """A finished pair-keyed stage's table at ``path`` holds, for every unit of the pairs table
    at ``pairs_dir``, the keys ``keys_of(the unit's pair ids)`` (tuples of the values of
    ``columns``), each exactly once (``once``; else at least once), and nothing else.

    Checked a unit at a time (its output files are named by it, :class:`pipeline.io.Unit`), so
    the card job holds one unit's keys, not the table's.

    Raises:
        StageFailed: naming ``what`` the rows should be, how many are repeated, missing and
            unexpected, and the first unit that is not as it should be.
    """
    from pipeline.io import read_unit, table_files, table_units

    repeated = missing = unexpected = rows = 0
    first_bad, seen = None, set()
    for unit in table_units(pairs_dir):
        seen.add(unit.key)
        expected = keys_of(unit.read(["pair_id"]).column("pair_id").to_pylist())
        try:
            table = read_unit(path, unit.key, columns)
            keys = list(zip(*(table.column(c).to_pylist() for c in columns)))
        except FileNotFoundError:
            keys = []
        found = set(keys)
        bad = (len(keys) - len(found) if once else 0, len(expected - found), len(found - expected))
        rows += len(keys)
        repeated, missing, unexpected = repeated + bad[0], missing + bad[1], unexpected + bad[2]
        if any(bad) and first_bad is None:
            first_bad = unit.key
    strays = [f.name for f in table_files(path) if f.name.rsplit("_", 1)[0] not in seen]
    if repeated or missing or unexpected or strays:
        where = f"; first in unit {first_bad}" if first_bad else ""
        stray = f"; {len(strays)} file(s) of no unit of {pairs_dir} (e.g. {strays[0]})" if strays else ""
        raise StageFailed(f"{path}: {rows} rows ({repeated} repeated ({', '.join(columns)}), {missing} missing, "
                          f"{unexpected} unexpected) for {what}{where}{stray}; every key must appear "
                          + ("exactly once" if once else "at least once"))


@dataclass
class StageDir:
    manifest: Manifest
    stage: str
    table: str
    view: dict[str, Any]  # flattened settings that decide the table's contents
    layout: dict[str, Any]  # settings that decide how the work is split (task count), not the rows

    @property
    def path(self) -> Path:
        return self.manifest.stage_dir(self.stage)

    @property
    def logs(self) -> Path:
        return self.path / "_logs"

    @property
    def fingerprint(self) -> str:
        return hash_view(self.view)

    @property
    def tasks(self) -> int:
        return int(self.layout["executor.tasks"])

    def conflicts(self) -> list[str]:
        """The settings that differ from those the existing directory was made with (what
        :meth:`prepare` would refuse), without touching anything; empty when none differ."""
        old = stored_settings(self.path)
        return diff_views({**old["view"], **old["layout"]}, {**self.view, **self.layout}) if old else []

    def prepare(self, force: bool = False) -> None:
        """Create the directory, or check that an existing one was made with the same settings.

        Raises:
            StageConflict: naming every key whose value differs from the existing run.
        """
        state_file = self.path / SETTINGS_FILE
        if force and self.path.exists():
            try:
                shutil.rmtree(self.path)
            except OSError as exc:
                raise (refused_write(exc, self.path) or exc) from exc
        if state_file.is_file():
            if changes := self.conflicts():
                raise StageConflict(
                    f"{self.path} was made with different settings:\n  "
                    + "\n  ".join(changes)
                    + "\nRe-run with --force to delete it and start over, or set run.output_dir elsewhere."
                )
            if not (self.path / "manifest.yaml").is_file():  # a full disk stopped the first prepare after _stage.json
                self._write_manifest()
            return
        if self.path.exists() and any(self.path.iterdir()):
            raise StageConflict(f"{self.path} exists, is not empty and was not made by sip; use --force to replace it")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (refused_write(exc, self.path) or exc) from exc
        state = {
            "stage": self.stage,
            "table": self.table,
            "fingerprint": self.fingerprint,
            "manifest_fingerprint": fingerprint(self.manifest),
            "view": self.view,
            "layout": self.layout,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_text_atomic(state_file, json.dumps(state, indent=1, sort_keys=True))
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_text_atomic(self.path / "manifest.yaml", yaml.safe_dump(self.manifest.model_dump(mode="json"), sort_keys=False))

    def check_upstream_of(self, downstream: str) -> None:
        """Raise unless this stage is complete *and* was made with the settings planned now.

        Complete means every task finished and the card is written: the card comes after the
        checks over all tasks' outputs (a document id used twice, say), so a stage that failed
        them is not read by the next one.
        """
        old = stored_settings(self.path)
        if not self.is_complete() or old is None or not (self.path / "card.json").is_file():
            raise StageFailed(f"{downstream}: the {self.stage} stage is not complete ({self.path}); "
                              f"run `sip {self.stage}` (or `sip run`) first")
        if "files" in self.layout and older_file_layout(self.path):
            # The file names a later stage looks rows up by (pipeline.io.UNIT_LAYOUT) differ.
            raise StageFailed(f"{downstream}: the {self.stage} outputs in {self.path} were written with an older file "
                              f"layout (one file per task and chunk, not per unit); re-run `sip {self.stage} --force` "
                              "first")
        if changes := diff_views(old["view"], self.view):
            raise StageFailed(f"{downstream}: the {self.stage} outputs in {self.path} were made with other settings "
                              f"({'; '.join(changes[:3])}); re-run `sip {self.stage} --force` first")

    def completed_ranks(self) -> set[int]:
        done = self.logs / "completions"
        return {int(p.name) for p in done.iterdir() if p.name.isdigit()} if done.is_dir() else set()

    def is_complete(self) -> bool:
        return self.completed_ranks() >= set(range(self.tasks))

    def merged_stats(self) -> dict[str, float]:
        """Counters of every step, summed over the finished tasks' stats files."""
        totals: dict[str, float] = {}
        stats_dir = self.logs / "stats"
        for path in sorted(stats_dir.glob("*.json")) if stats_dir.is_dir() else []:
            for step in json.loads(path.read_text()):
                for key, value in step.get("stats", {}).items():
                    amount = value.get("total", 0) if isinstance(value, dict) else value
                    if isinstance(amount, (int, float)):
                        totals[key] = totals.get(key, 0) + amount
        return totals
