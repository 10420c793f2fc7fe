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

A kill drawn past the end of the run does not land: the finished run is compared, its output
removed and the stage started afresh, so that every kill asked for interrupts a run (up to
``MAX_ATTEMPTS`` starts per kill). The report gives the kills that landed and how many
finished runs were compared; lost and duplicated rows are summed over them, and each
equality must hold for all of them. Texts are not compared: a vLLM engine on CPU is not
bitwise reproducible between runs, while the keys (and for judgments, the candidate ids the
texts hash to, which come from copied upstream tables) must match exactly.

Training is two more entries, run the same way with ``sip train`` on copies of every
pipeline table: ``train-offline`` (the manifest's offline phases) and ``train-online`` (its
online phases), each alone, with ``train.log_every: 1`` so every step's loss is logged, a
checkpoint at every step the phases allow (``train.checkpoint.every``: 1, or the online
phases' ``push_every``) and ``export_hf`` off. Their "rows" are the optimizer steps whose
loss was logged: lost (in the reference's metrics, not in the chaos run's last record of
them), extra (the other way round), and the losses compared step by step (a step redone after a resume counts once,
with the value of the run that went on from it). Also compared: the tokens trained on and
the final weights' content hash. The share left, for the kill delays, is the share of the
reference's steps past the chaos run's latest checkpoint.
"""

from __future__ import annotations

import json
import math
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
from pipeline.app.registry import inactive, upstream_closure
from pipeline.manifest import Manifest, parse_manifest

# The row key of each stage's table: what must appear exactly once.
KEYS = {"shard": ["pair_id"], "rewrite": ["pair_id"], "rollout": ["pair_id", "sample"],
        "judge": ["pair_id", "cand_id"], "prefs": ["pair_id"]}
# The training entries: which of the manifest's phases each trains.
TRAIN_RUNS = {"train-offline": lambda phase: phase.source != "online",
              "train-online": lambda phase: phase.source == "online"}
ORDER = list(KEYS) + list(TRAIN_RUNS)
MAX_ATTEMPTS = 4  # starts per kill asked, at most: a short run often finishes before its kill


def _manifest_at(manifest: Manifest, directory: Path, train_run: str | None = None) -> Path:
    """``manifest`` writing under ``directory``, saved as ``directory.yaml``; its path.
    ``train_run``: keep only that entry's phases (:data:`TRAIN_RUNS`), every step logged."""
    data = manifest.absolute_data()
    data["run"]["output_dir"] = str(directory)
    if train_run is not None:
        kept = [(p, phase) for p, phase in zip(data["train"]["phases"], manifest.train.phases)
                if TRAIN_RUNS[train_run](phase)]
        # A checkpoint at every step an online phase allows (a multiple of its push_every), so
        # kills land between checkpoints and resumes start from them.
        every = math.lcm(1, *(phase.online.push_every for _, phase in kept if phase.source == "online"))
        data["train"].update(phases=[p for p, _ in kept], log_every=1, export_hf=False)
        data["train"]["checkpoint"] = {**data["train"].get("checkpoint", {}), "every": every}
    parse_manifest(data)  # refuse a broken manifest here, not in a killed child
    path = directory.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _command(name: str) -> str:
    return "train" if name in TRAIN_RUNS else name


def _start(stage: str, manifest_path: Path, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", CLI_MODULE, _command(stage), "-m", str(manifest_path)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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


def _train_record(train_dir: Path) -> tuple[dict[int, float], dict]:
    """Each logged step's loss, from the last process that logged it, and the run's summary."""
    from trainer.plan import TRAIN_SUMMARY_FILE

    losses: dict[int, float] = {}
    versions = sorted((train_dir / "metrics").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        if (version / "metrics.csv").is_file():
            frame = pl.read_csv(version / "metrics.csv", infer_schema_length=0)
            for step, loss in frame.select("step", "loss").iter_rows():
                if loss not in (None, ""):
                    losses[int(step)] = float(loss)
    return losses, json.loads((train_dir / TRAIN_SUMMARY_FILE).read_text())


def _weights_sha(summary: dict) -> str:
    import torch

    from trainer.model import WEIGHTS_FILE, state_sha

    return state_sha(torch.load(Path(summary["final"]) / WEIGHTS_FILE, map_location="cpu", weights_only=True))


def compare_train(reference: Path, chaos: Path) -> dict:
    """Steps lost and extra, losses, tokens and final weights of ``chaos`` against ``reference``
    (train output directories)."""
    ref, ref_summary = _train_record(reference)
    got, got_summary = _train_record(chaos)
    both = sorted(set(ref) & set(got))
    diff = max((abs(ref[s] - got[s]) for s in both), default=0.0)
    return {"reference_rows": len(ref), "rows": len(got), "lost": len(set(ref) - set(got)),
            "duplicated": len(set(got) - set(ref)), "keys_equal": set(ref) == set(got),
            "max_loss_diff": diff, "losses_equal": diff == 0.0 and set(ref) == set(got),
            "tokens_equal": ref_summary["tokens"] == got_summary["tokens"],
            "weights_equal": _weights_sha(ref_summary) == _weights_sha(got_summary)}


def _pooled(episodes: list[dict]) -> dict:
    """The comparisons of every finished chaos run as one: counts summed over runs (rows as
    the last run's), every equality over all runs, the largest loss difference."""
    out = dict(episodes[-1])
    for key in ("lost", "duplicated"):
        out[key] = sum(e[key] for e in episodes)
    for key in ("keys_equal", "losses_equal", "tokens_equal", "weights_equal"):
        if key in out:
            out[key] = all(e[key] for e in episodes)
    if "max_loss_diff" in out:
        out["max_loss_diff"] = max(e["max_loss_diff"] for e in episodes)
    return out


def _share_left(name: str, reference: Path, chaos: Path) -> float:
    """The share of the run not yet done: table files, or for training, steps past the latest checkpoint."""
    if name in TRAIN_RUNS:
        from trainer.checkpoint import latest_checkpoint
        from trainer.plan import TRAIN_SUMMARY_FILE

        total = json.loads((reference / TRAIN_SUMMARY_FILE).read_text())["steps"]
        latest = latest_checkpoint(chaos / "checkpoints")
        done = int(latest.name.split("-")[1]) if latest is not None else 0
        return 1 - done / max(1, total)
    return 1 - len(list(chaos.glob("*.parquet"))) / max(1, len(list(reference.glob("*.parquet"))))


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
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
        raise ValueError(f"bench chaos: unknown stage(s) {unknown}; stages: {', '.join(ORDER)}")
    directory = Path(directory).resolve()  # the saved manifests' relative paths would resolve beside them
    directory.mkdir(parents=True, exist_ok=True)
    reference = directory / "reference"
    reference_manifest = _manifest_at(manifest, reference)
    rng = random.Random(seed)
    rows = []
    for stage in sorted(stages, key=ORDER.index):
        train = stage in TRAIN_RUNS
        if train and (manifest.train is None or not any(map(TRAIN_RUNS[stage], manifest.train.phases))):
            log(f"chaos: {stage}: the manifest has no such phase; skipped")
            continue
        if reason := inactive(manifest, stage):
            log(f"chaos: {stage}: {reason}; skipped")
            continue
        # A training entry reads every table (its phases' and the online phase's candidates).
        needed = list(KEYS) if train else upstream_closure(stage)
        upstream = [name for name in needed if not inactive(manifest, name)]
        for name in upstream:  # the reference's inputs, uninterrupted (kept between runs)
            if not (reference / name / "card.json").is_file():
                _run(name, reference_manifest, directory / "reference.log")
        # A training entry's reference trains in a directory of its own (its phases alone),
        # reading the reference's tables.
        ref_out = directory / f"reference-{stage}" if train else reference
        ref_manifest = _manifest_at(manifest, ref_out, stage) if train else reference_manifest
        output = "train" if train else stage
        if train:
            shutil.rmtree(ref_out, ignore_errors=True)
            ref_out.mkdir()
            for name in upstream:
                (ref_out / name).symlink_to(reference / name)
        shutil.rmtree(ref_out / output, ignore_errors=True)
        wall = _run(stage, ref_manifest, directory / "reference.log")

        chaos = directory / f"chaos-{stage}"
        shutil.rmtree(chaos, ignore_errors=True)
        chaos.mkdir()
        for name in upstream:
            if (reference / name).is_dir():
                shutil.copytree(reference / name, chaos / name)
        chaos_manifest = _manifest_at(manifest, chaos, stage if train else None)
        log_path = directory / f"chaos-{stage}.log"
        done_marker = chaos / output / ("train_summary.json" if train else "card.json")

        def compared() -> dict:
            return compare_train(ref_out / output, chaos / output) if train else \
                compare(reference / stage, chaos / stage, KEYS[stage])

        landed, started, episodes = 0, time.perf_counter(), []
        for _ in range(MAX_ATTEMPTS * kills):
            if landed == kills:
                break
            delay = rng.uniform(0, wall * max(0.25, _share_left(stage, ref_out / output, chaos / output)))
            if _kill_after(stage, chaos_manifest, delay, log_path):
                landed += 1
            elif done_marker.is_file():
                # The run outlived its kill and finished: compared, then started afresh, so the
                # kills still to come interrupt a run.
                episodes.append(compared())
                shutil.rmtree(chaos / output)
        _run(stage, chaos_manifest, log_path)
        episodes.append(compared())
        row = {"stage": stage, "kills": landed, "runs_compared": len(episodes), "reference_s": round(wall, 1),
               "chaos_s": round(time.perf_counter() - started, 1), **_pooled(episodes)}
        log(f"chaos: {stage}: {row}")
        rows.append(row)
    return {"kills_asked": kills, "seed": seed, "rows": rows}


def table(report: dict) -> str:
    """The report as a Markdown table."""
    lines = ["| stage | kills landed | runs compared | rows or steps (reference) | lost | duplicated or extra | "
             "keys equal | losses equal (max diff) | tokens, weights equal | reference s | chaos s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        train = "losses_equal" in r
        losses = f"{r['losses_equal']} ({r['max_loss_diff']:.2g})" if train else "-"
        same = f"{r['tokens_equal']}, {r['weights_equal']}" if train else "-"
        lines.append(f"| {r['stage']} | {r['kills']} | {r['runs_compared']} | {r['rows']} ({r['reference_rows']}) | {r['lost']} | "
                     f"{r['duplicated']} | {r['keys_equal']} | {losses} | {same} | {r['reference_s']} | {r['chaos_s']} |")
    return "\n".join(lines)
