"""`sip bench memory` (`make bench-memory`): peak memory of one judge task and one prefs task
as the corpus grows, with the task count fixed.

A pair-keyed task reads its own units of the upstream tables (:class:`pipeline.io.Unit`), so
its memory should stay flat while its share of the corpus grows. This benchmark checks it
without an LLM: it writes synthetic pairs, rewrites, rollouts and judgments tables of each
size (``--pairs``, cached under ``--dir``) laid out as the stages lay them out, then runs, each
in a fresh process:

- **judge task**: rank 0 of ``--tasks`` of the judge stage's own steps (the unit reader, the
  candidate assembly, the scoring core, the chunk files), with the likelihood quality mode
  scored by :class:`_UniformScorer` in place of a model (no other criterion): what is measured
  is the task's tables and rows, not a model's memory;
- **prefs task**: rank 0 of ``--tasks`` of the prefs stage's own steps, as they run;
- **whole-table read** (the reference): ``pyarrow.parquet.read_table`` of the columns a judge
  task used to read whole (the rewrites' and the rollouts'), what every task held before.

Each reports its peak RSS (``ru_maxrss``) and wall time, and the pairs it handled.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.app.bench.fresh_process import run_side

ROW_GROUP = 2048  # pairs per row group of the pairs table: the shard stage's (io.part_file)
SHARD_FILES = 8
ROLLOUTS = 2  # K rollouts per pair
PREFIX_TOKENS, SUFFIX_TOKENS = 96, 16
_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her she there been one all we their has would when if so what can more no out up into "
          "river stone market winter engine garden letter number system village").split()


def _texts(rng: np.random.Generator, count: int, words: int) -> list[str]:
    """``count`` distinct texts of ``words`` words (a small pool, numbered: sizes, not content, matter)."""
    pool = [" " + " ".join(rng.choice(_WORDS, words)) for _ in range(64)]
    return [f"{pool[i % 64]} {i}." for i in range(count)]


def _ids(rng: np.random.Generator, rows: int, length: int) -> pa.ListArray:
    values = pa.array(rng.integers(100, 40_000, rows * length, dtype=np.int32))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * length + 1, length, dtype=np.int32)), values)


def write_synthetic_run(directory: Path, pairs: int, seed: int = 0) -> Path:
    """The shard, rewrite, rollout and judge tables of ``pairs`` pairs under ``directory``, named
    as the stages name them (one file per unit and chunk); kept for the next run (``.done``)."""
    from pipeline.schema import JUDGMENTS, PAIRS, REWRITES, ROLLOUTS as ROLLOUTS_SCHEMA

    if (directory / ".done").is_file():
        return directory
    rng = np.random.default_rng(seed)
    for stage in ("shard", "rewrite", "rollout", "judge"):
        (directory / stage).mkdir(parents=True, exist_ok=True)
    per_file = -(-pairs // SHARD_FILES)
    for f in range(SHARD_FILES):
        start, stop = f * per_file, min(pairs, (f + 1) * per_file)
        if start >= stop:
            break
        with pq.ParquetWriter(directory / "shard" / f"{f:05d}.parquet", PAIRS, compression="zstd") as writer:
            for g, g_start in enumerate(range(start, stop, ROW_GROUP)):
                n = min(ROW_GROUP, stop - g_start)
                ids = [f"p{i:09d}" for i in range(g_start, g_start + n)]
                suffixes = _texts(rng, n, 12)
                writer.write_table(pa.table({
                    "pair_id": ids, "doc_id": ids, "source": ["synthetic"] * n, "prefix": _texts(rng, n, 70),
                    "suffix": suffixes, "prefix_ids": _ids(rng, n, PREFIX_TOKENS),
                    "suffix_ids": _ids(rng, n, SUFFIX_TOKENS), "split_offset": [PREFIX_TOKENS] * n,
                    "doc_tokens": [PREFIX_TOKENS + SUFFIX_TOKENS] * n, "meta": ["{}"] * n}, schema=PAIRS))
                unit = f"{f:05d}_{g:05d}_00000.parquet"  # one chunk per unit
                pq.write_table(pa.table({
                    "pair_id": ids, "rewrite": _texts(rng, n, 12), "status": ["ok"] * n, "error": [None] * n,
                    "model": ["m"] * n, "prompt_sha": ["s"] * n, "prompt_tokens": [300] * n,
                    "completion_tokens": [20] * n, "finish_reason": ["stop"] * n, "prefix_tokens": [PREFIX_TOKENS] * n,
                }, schema=REWRITES), directory / "rewrite" / unit, compression="zstd")
                k = n * ROLLOUTS
                rollout_ids = [i for i in ids for _ in range(ROLLOUTS)]
                pq.write_table(pa.table({
                    "pair_id": rollout_ids, "sample": [s for _ in ids for s in range(ROLLOUTS)],
                    "cand_id": [f"{i}-{s}" for i in ids for s in range(ROLLOUTS)], "text": _texts(rng, k, 12),
                    "token_ids": _ids(rng, k, SUFFIX_TOKENS), "finish_reason": ["length"] * k, "status": ["ok"] * k,
                    "error": [None] * k, "prompt_tokens": [PREFIX_TOKENS] * k, "completion_tokens": [SUFFIX_TOKENS] * k,
                    "model": ["m"] * k}, schema=ROLLOUTS_SCHEMA), directory / "rollout" / unit, compression="zstd")
                c = n * (2 + ROLLOUTS)
                sources = ["original", "rewrite", *["rollout"] * ROLLOUTS] * n
                pq.write_table(pa.table({
                    "pair_id": [i for i in ids for _ in range(2 + ROLLOUTS)],
                    "cand_id": [f"c{j}" for j in range(c)], "source": sources, "text": _texts(rng, c, 12),
                    "token_ids": _ids(rng, c, SUFFIX_TOKENS), "safety": [None] * c, "quality": rng.normal(size=c),
                    "factuality": [None] * c, "reward": rng.normal(size=c), "judge_raw": ["{}"] * c,
                    "parse_status": ["ok"] * c, "shown_order": [None] * c, "judge_samples": [1] * c,
                    "prefix_tokens": [PREFIX_TOKENS] * c}, schema=JUDGMENTS), directory / "judge" / unit,
                    compression="zstd")
    (directory / ".done").write_text(str(pairs))
    return directory


def _manifest(directory: Path):
    from pipeline.manifest import parse_manifest

    return parse_manifest({
        "run": {"name": "bench-memory", "output_dir": str(directory / "out")},
        "corpus": {"paths": ["embedded"]}, "policy": {"model": "embedded"}, "judge": {"model": "embedded"},
        "shard": {"suffix_tokens": SUFFIX_TOKENS},
        "judging": {"safety": None, "quality": {"mode": "likelihood"}, "chunk_size": 64},
    })


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def judge_task_side(spec: dict) -> dict:
    """Rank ``spec['rank']`` of ``spec['tasks']`` judge tasks on the synthetic run, scored by a
    model-free scorer; peak RSS (MiB), seconds and pairs."""
    import shutil

    from pipeline.engines.base import Engine
    from pipeline.io import UnitReader
    from pipeline.schema import JUDGMENTS
    from stages.judge import PAIR_COLUMNS, JudgeStep, UpstreamCandidates

    class _UniformScorer(Engine):
        """Every given token at log-prob -1: the likelihood criterion runs, no model loads."""

        model_id, max_model_len = "uniform", 1 << 20

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def generate(self, requests, sampling):
            raise NotImplementedError("the memory benchmark judges by likelihood only")

        def score(self, sequences, starts):
            return [[-1.0] * (len(s) - start) for s, start in zip(sequences, starts)]

    class _Step(JudgeStep):
        def start_engine(self):
            from transformers import AutoTokenizer

            return _UniformScorer(AutoTokenizer.from_pretrained(spec["tokenizer_dir"]))

    run = Path(spec["dir"])
    m = _manifest(run)
    out = m.stage_dir("judge")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    upstream = UpstreamCandidates(str(run / "rewrite"), spec["tokenizer_dir"], SUFFIX_TOKENS, str(run / "rollout"))
    step = _Step(m, str(out), JUDGMENTS, upstream)
    pairs = sum(len(u.rows) for u in UnitReader(str(run / "shard"), columns=["pair_id"]).run(
        rank=spec["rank"], world_size=spec["tasks"]))
    reader = UnitReader(str(run / "shard"), columns=PAIR_COLUMNS)
    for _ in step.run(reader.run(rank=spec["rank"], world_size=spec["tasks"]), spec["rank"], spec["tasks"]):
        pass
    return {"peak_rss_mb": _peak_rss_mb(), "seconds": round(time.perf_counter() - started, 1), "pairs": pairs}


def prefs_task_side(spec: dict) -> dict:
    """Rank ``spec['rank']`` of ``spec['tasks']`` prefs tasks on the synthetic judgments."""
    import shutil

    from pipeline.io import UnitReader, row_count
    from pipeline.stage import StageDir
    from stages.prefs import PAIR_SCHEMA, PrefsPlan, PrefsStep

    run = Path(spec["dir"])
    m = _manifest(run)
    plan = PrefsPlan(m, StageDir(m, "prefs", "preferences", {}, {"executor.tasks": spec["tasks"]}), run / "judge",
                     run / "shard")
    out = plan.stage.path
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    reader = UnitReader(str(run / "shard"), columns=list(PAIR_SCHEMA))
    for _ in PrefsStep(plan).run(reader.run(rank=spec["rank"], world_size=spec["tasks"]), spec["rank"], spec["tasks"]):
        pass
    written = row_count(out)  # the preferences files (sft/ beside them is not counted)
    return {"peak_rss_mb": _peak_rss_mb(), "seconds": round(time.perf_counter() - started, 1),
            "preference_rows": written}


def whole_table_side(spec: dict) -> dict:
    """What a judge task held before unit reads: the rewrites' and rollouts' columns, whole."""
    from pipeline.io import read_table

    run = Path(spec["dir"])
    started = time.perf_counter()
    rewrites = read_table(run / "rewrite", columns=["pair_id", "rewrite", "status"])
    rollouts = read_table(run / "rollout", columns=["pair_id", "sample", "text", "token_ids", "status"])
    return {"peak_rss_mb": _peak_rss_mb(), "seconds": round(time.perf_counter() - started, 1),
            "rows": rewrites.num_rows + rollouts.num_rows}


def bench_memory(directory: Path, sizes: list[int], tasks: int = 16) -> dict:
    """Peak RSS of a judge task, a prefs task and a whole-table read, per corpus size.

    Args:
        directory: where the synthetic runs are written (and kept, ``<directory>/<pairs>/``).
        sizes: pairs per run, e.g. 10_000, 100_000, 1_000_000.
        tasks: the task count of both stages (fixed: a task's share grows with the corpus).
    """
    from pipeline.models import policy_tokenizer_dir

    tokenizer_dir = str(policy_tokenizer_dir(_manifest(Path(directory))))
    rows = []
    for pairs in sizes:
        run = write_synthetic_run(Path(directory) / str(pairs), pairs)
        spec = {"dir": str(run), "tasks": tasks, "rank": 0, "tokenizer_dir": tokenizer_dir}
        rows.append({"pairs": pairs, "tasks": tasks,
                     "judge_task": run_side(judge_task_side, spec, run, "judge-task"),
                     "prefs_task": run_side(prefs_task_side, spec, run, "prefs-task"),
                     "whole_table_read": run_side(whole_table_side, spec, run, "whole-table")})
    first, last = rows[0], rows[-1]
    growth = {k: round(last[k]["peak_rss_mb"] / first[k]["peak_rss_mb"], 2)
              for k in ("judge_task", "prefs_task", "whole_table_read")}
    return {"rows": rows, f"peak_rss_growth_{first['pairs']}_to_{last['pairs']}": growth}


def table(report: dict) -> str:
    """The report as a Markdown table (peak RSS in MiB)."""
    lines = ["| pairs | judge task (its pairs) | prefs task | whole-table read |", "|---|---|---|---|"]
    lines += [f"| {r['pairs']:,} | {r['judge_task']['peak_rss_mb']} ({r['judge_task']['pairs']:,}) | "
              f"{r['prefs_task']['peak_rss_mb']} | {r['whole_table_read']['peak_rss_mb']} |" for r in report["rows"]]
    return "\n".join(lines)
