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
  task used to read whole (the rewrites' and the rollouts'), what every task held before;
- **trainer data**: what a training rank does with its tables before and while it trains,
  on the pairs table (an online phase's prefixes) and a synthetic preferences table of the
  same pairs (a DPO phase): the conversion into the table cache (trainer/table_cache.py),
  the pair-uniqueness check, the reference log-probs written and joined by pair, and
  :data:`TRAIN_MICRO_BATCHES` micro-batches of :data:`TRAIN_BATCH` rows read in the phase's
  seeded order;
- **trainer whole-table read** (the reference): the preferences table read whole, what the
  trainer did before.

Each reports its peak RSS (``ru_maxrss``) and wall time, and the pairs it handled. The trainer
sides also report the peak of the process's *anonymous* memory (``RssAnon``, sampled every
10 ms): what the process itself holds, file-backed pages (libraries) aside.
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.app.bench.fresh_process import run_side

ROW_GROUP = 2048  # pairs per row group of the pairs table: the shard stage's (io.part_file)
SHARD_FILES = 8
ROLLOUTS = 2  # K rollouts per pair
TRAIN_BATCH, TRAIN_MICRO_BATCHES = 8, 400  # rows per micro-batch, micro-batches read by the trainer side
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


def write_synthetic_preferences(directory: Path, seed: int = 1) -> Path:
    """``<directory>/prefs/``: a preferences row for every pair of the synthetic shard table
    (chosen and rejected suffixes of SUFFIX_TOKENS ids), one file per shard file."""
    from pipeline.schema import PREFERENCES

    out = directory / "prefs"
    if (out / ".done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard_file in sorted((directory / "shard").glob("*.parquet")):
        parquet = pq.ParquetFile(shard_file)
        with pq.ParquetWriter(out / shard_file.name, PREFERENCES, compression="zstd") as writer:
            for g in range(parquet.metadata.num_row_groups):
                pairs = parquet.read_row_group(g, columns=["pair_id", "prefix", "prefix_ids"])
                n = pairs.num_rows
                writer.write_table(pa.table({
                    "pair_id": pairs["pair_id"], "prefix_ids": pairs["prefix_ids"],
                    "chosen_ids": _ids(rng, n, SUFFIX_TOKENS), "rejected_ids": _ids(rng, n, SUFFIX_TOKENS),
                    "chosen_source": ["rewrite"] * n, "rejected_source": ["rollout"] * n,
                    "chosen_reward": rng.normal(size=n), "rejected_reward": rng.normal(size=n),
                    "prompt": pairs["prefix"], "chosen": _texts(rng, n, 12), "rejected": _texts(rng, n, 12),
                }, schema=PREFERENCES))
    (out / ".done").write_text("done")
    return out


class _AnonPeak:
    """Peak ``RssAnon`` of this process (MiB), sampled every 10 ms on a thread while open."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self):
        def poll():
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, self.now())
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = round(max(self.peak, self.now()), 1)


def trainer_side(spec: dict) -> dict:
    """A training rank's data loading on the synthetic run (see the module docstring): peak
    anonymous memory (MiB), peak RSS (MiB), seconds, rows."""
    import shutil

    from trainer.ref_logps import check_unique_pairs, join_reference, write_set
    from trainer.source import TableSource, load_table

    run = Path(spec["dir"])
    cache = run / "train-cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(run / "ref", ignore_errors=True)
    started = time.perf_counter()
    with _AnonPeak() as anon:
        prefixes = TableSource(load_table(run / "shard", "prefixes", "bench", cache), "prefixes", 0, 128)
        prefs = TableSource(load_table(run / "prefs", "preferences", "bench", cache), "preferences", 0, 128)
        check_unique_pairs(prefs.table, run / "prefs")
        rows = prefs.rows
        write_set(run / "ref", {"reference.model_sha": "bench"}, prefs.table, -np.arange(rows, dtype=np.float64),
                  -np.arange(rows, dtype=np.float64) - 1.0, checkpoint="bench", phase="dpo",
                  table_path=run / "prefs", manifest_fingerprint="bench")
        [ref_dir] = [p for p in (run / "ref").iterdir() if p.is_dir()]
        chosen, _ = join_reference(prefs.table, run / "prefs", ref_dir)
        if not np.array_equal(chosen, -np.arange(rows, dtype=np.float64)):
            raise AssertionError("the joined reference log-probs are not the table's rows'")
        read = 0
        for micro in range(TRAIN_MICRO_BATCHES):
            for source in (prefixes, prefs):
                read += len(source.examples(source.row_indices(micro * TRAIN_BATCH, TRAIN_BATCH)))
    return {"peak_anon_mb": anon.peak, "peak_rss_mb": _peak_rss_mb(), "seconds": round(time.perf_counter() - started, 1),
            "rows": prefixes.rows + prefs.rows, "rows_read": read}


def trainer_whole_side(spec: dict) -> dict:
    """What the trainer held before: the preferences table's columns read whole."""
    from pipeline.io import read_table
    from trainer.source import COLUMNS

    run = Path(spec["dir"])
    started = time.perf_counter()
    with _AnonPeak() as anon:
        table = read_table(run / "prefs", columns=COLUMNS["preferences"])
    return {"peak_anon_mb": anon.peak, "peak_rss_mb": _peak_rss_mb(), "seconds": round(time.perf_counter() - started, 1),
            "rows": table.num_rows}


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
        write_synthetic_preferences(run)
        spec = {"dir": str(run), "tasks": tasks, "rank": 0, "tokenizer_dir": tokenizer_dir}
        rows.append({"pairs": pairs, "tasks": tasks,
                     "judge_task": run_side(judge_task_side, spec, run, "judge-task"),
                     "prefs_task": run_side(prefs_task_side, spec, run, "prefs-task"),
                     "whole_table_read": run_side(whole_table_side, spec, run, "whole-table"),
                     "trainer_data": run_side(trainer_side, spec, run, "trainer-data"),
                     "trainer_whole_table": run_side(trainer_whole_side, spec, run, "trainer-whole")})
    first, last = rows[0], rows[-1]
    growth = {k: round(last[k]["peak_rss_mb"] / first[k]["peak_rss_mb"], 2)
              for k in ("judge_task", "prefs_task", "whole_table_read", "trainer_data", "trainer_whole_table")}
    return {"rows": rows, f"peak_rss_growth_{first['pairs']}_to_{last['pairs']}": growth}


def table(report: dict) -> str:
    """The report as a Markdown table (peak RSS in MiB)."""
    lines = ["| pairs | judge task (its pairs) | prefs task | whole-table read | trainer data (anonymous) | "
             "trainer whole-table read (anonymous) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['pairs']:,} | {r['judge_task']['peak_rss_mb']} ({r['judge_task']['pairs']:,}) | "
              f"{r['prefs_task']['peak_rss_mb']} | {r['whole_table_read']['peak_rss_mb']} | "
              f"{r['trainer_data']['peak_rss_mb']} ({r['trainer_data']['peak_anon_mb']}) | "
              f"{r['trainer_whole_table']['peak_rss_mb']} ({r['trainer_whole_table']['peak_anon_mb']}) |"
              for r in report["rows"]]
    return "\n".join(lines)
