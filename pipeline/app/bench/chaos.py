"""`sip bench chaos` (`make chaos`): a stage killed at random moments, resumed, against the same
stage run without a kill.

For each stage named (in pipeline order), on the manifest's own data:

1. **reference**: the stage runs once, uninterrupted, in ``<dir>/reference`` (its upstream
   stages first, also uninterrupted); its wall time ``T`` is kept;
2. **chaos**: in ``<dir>/chaos-<stage>``, holding copies of the reference's upstream tables,
   ``sip <stage>`` is started ``--kills`` times and each time sent SIGKILL (its whole process
   group: the executor's workers and engine processes too) after a delay drawn by ``--seed``
   uniformly from ``[0, T x f]``, where ``f`` is the share of the reference's table files not
   yet written (at least a quarter: start-up and the card are part of every run), so that the
   kills stay inside the shrinking resumed runs; then it runs to the end;
3. the two tables are compared by the stage's row key: rows lost (in the reference, not in
   the chaos run), rows duplicated (a key twice), and whether the key sets are equal.

A kill that comes after the run already ended is not counted; the report gives how many of
the kills landed. Texts are not compared: a vLLM engine on CPU is not bitwise reproducible
between runs, while the keys (and for judgments, the candidate ids the texts hash to, which
come from copied upstream tables) must match exactly.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import yaml

from pipeline.app.bench.fresh_process import CLI_MODULE
from pipeline.app.registry import inactive
from pipeline.manifest import Manifest, parse_manifest

# The row key of each stage's table: what must appear exactly once.
KEYS = {"shard": ["pair_id"], "rewrite": ["pair_id"], "rollout": ["pair_id", "sample"],
        "judge": ["pair_id", "cand_id"], "prefs": ["pair_id"]}
ORDER = list(KEYS)


def _manifest_at(manifest: Manifest, directory: Path) -> Path:
    """``manifest`` writing under ``directory``, saved as ``directory.yaml``; its path."""
    data = manifest.absolute_data()
    data["run"]["output_dir"] = str(directory)
    parse_manifest(data)  # refuse a broken manifest here, not in a killed child
    path = directory.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _start(stage: str, manifest_path: Path, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", CLI_MODULE, stage, "-m", str(manifest_path)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _run(stage: str, manifest_path: Path, log_path: Path) -> float:
    """``sip <stage>`` to the end; its wall time (s).

    Raises:
        RuntimeError: the run failed; names the log.
    """
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        rc = _start(stage, manifest_path, log).wait()
    if rc != 0:
        raise RuntimeError(f"chaos: sip {stage} failed (rc {rc}); see {log_path}")
    return time.perf_counter() - started


def _kill_after(stage: str, manifest_path: Path, delay_s: float, log_path: Path) -> bool:
    """Start ``sip <stage>``, SIGKILL its process group after ``delay_s``; False when it had
    already ended by then (the kill did not land)."""
    with open(log_path, "ab") as log:
        proc = _start(stage, manifest_path, log)
        try:
            proc.wait(timeout=delay_s)
            return False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True


def _keys(stage_dir: Path, key: list[str]) -> pl.DataFrame:
    return pl.read_parquet(str(stage_dir / "*.parquet"), columns=key) if list(stage_dir.glob("*.parquet")) else \
        pl.DataFrame(schema={k: pl.String for k in key})


def compare(reference: Path, chaos: Path, key: list[str]) -> dict:
    """Rows lost and duplicated in ``chaos`` against ``reference`` (stage directories)."""
    ref, got = _keys(reference, key), _keys(chaos, key)
    lost = ref.unique().join(got.unique(), on=key, how="anti").height
    return {"reference_rows": ref.height, "rows": got.height, "lost": lost,
            "duplicated": got.height - got.unique().height,
            "keys_equal": ref.unique().sort(key).equals(got.unique().sort(key))}


def bench_chaos(manifest: Manifest, directory: Path, stages: list[str], kills: int = 20, seed: int = 0,
                log=print) -> dict:
    """Each stage of ``stages`` killed ``kills`` times at random moments and resumed, compared
    with an uninterrupted run (see the module docstring).

    Raises:
        ValueError: an unknown stage name.
        RuntimeError: a run that was not killed failed (its log is named).
    """
    unknown = [s for s in stages if s not in KEYS]
    if unknown:
        raise ValueError(f"bench chaos: unknown stage(s) {unknown}; stages: {', '.join(ORDER)}")
    directory = Path(directory).resolve()  # the saved manifests' relative paths would resolve beside them
    directory.mkdir(parents=True, exist_ok=True)
    reference = directory / "reference"
    reference_manifest = _manifest_at(manifest, reference)
    rng = random.Random(seed)
    rows = []
    for stage in sorted(stages, key=ORDER.index):
        if reason := inactive(manifest, stage):
            log(f"chaos: {stage}: {reason}; skipped")
            continue
        upstream = [name for name in ORDER[:ORDER.index(stage)] if not inactive(manifest, name)]
        for name in upstream:  # the reference's inputs, uninterrupted (kept between runs)
            if not (reference / name / "card.json").is_file():
                _run(name, reference_manifest, directory / "reference.log")
        shutil.rmtree(reference / stage, ignore_errors=True)
        wall = _run(stage, reference_manifest, directory / "reference.log")

        chaos = directory / f"chaos-{stage}"
        shutil.rmtree(chaos, ignore_errors=True)
        chaos.mkdir()
        for name in upstream:
            if (reference / name).is_dir():
                shutil.copytree(reference / name, chaos / name)
        chaos_manifest = _manifest_at(manifest, chaos)
        log_path = directory / f"chaos-{stage}.log"
        landed, started = 0, time.perf_counter()
        reference_files = max(1, len(list((reference / stage).glob("*.parquet"))))
        for _ in range(kills):
            left = 1 - len(list((chaos / stage).glob("*.parquet"))) / reference_files
            delay = rng.uniform(0, wall * max(0.25, left))
            if _kill_after(stage, chaos_manifest, delay, log_path):
                landed += 1
            elif (chaos / stage / "card.json").is_file():
                break  # finished before this kill: nothing left to interrupt
        _run(stage, chaos_manifest, log_path)
        row = {"stage": stage, "kills": landed, "reference_s": round(wall, 1),
               "chaos_s": round(time.perf_counter() - started, 1),
               **compare(reference / stage, chaos / stage, KEYS[stage])}
        log(f"chaos: {stage}: {row}")
        rows.append(row)
    return {"kills_asked": kills, "seed": seed, "rows": rows}


def table(report: dict) -> str:
    """The report as a Markdown table."""
    lines = ["| stage | kills landed | rows (reference) | lost | duplicated | keys equal | reference s | chaos s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['kills']} | {r['rows']} ({r['reference_rows']}) | {r['lost']} | {r['duplicated']} | "
              f"{r['keys_equal']} | {r['reference_s']} | {r['chaos_s']} |" for r in report["rows"]]
    return "\n".join(lines)
