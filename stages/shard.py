"""Shard stage: cut each document into (prefix, suffix) pairs of policy tokens.

For every document the splitter tokenizes the whole text, draws ``pairs_per_document``
distinct split points from an RNG seeded by (seed, doc id) (so the same document always
splits the same way, whatever task reads it), and emits, per split point ``s``:

- ``suffix_ids = ids[s : s + N]`` (exactly N tokens),
- ``prefix_ids = ids[max(0, s - max_prefix) : s]`` (at least ``min_prefix`` tokens),
- ``prefix`` / ``suffix``: the document's own characters covered by those tokens (from the
  tokenizer's offsets, so no decode artefacts; prefix + suffix is a substring of the text).

Documents shorter than ``min_prefix + N`` tokens are skipped and counted.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import polars as pl
import pyarrow as pa
import xxhash
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from pipeline import assets
from pipeline.cards import write_card
from pipeline.corpus import CorpusFile, CorpusReader, resolve_corpus
from pipeline.executor import make_executor, sbatch_script, wait_for_jobs
from pipeline.io import TableWriter, read_table
from pipeline.manifest import Manifest, fingerprint, fingerprinted_view, hash_view
from pipeline.models import policy_tokenizer_dir
from pipeline.schema import PAIRS, pair_id, provenance, with_provenance
from pipeline.stage import StageDir, StageFailed
from pipeline.tokenizer import load_tokenizer, tokenizer_id

STAGE = "shard"

_BATCH = 64  # documents per batch-encode call: enough for the Rust tokenizer to parallelise


def split_points(doc_id: str, n_tokens: int, *, seed: int, suffix_tokens: int, min_prefix: int, pairs: int) -> list[int]:
    """Sorted, distinct suffix start offsets for a document; empty if it is too short."""
    lo, hi = min_prefix, n_tokens - suffix_tokens
    if hi < lo:
        return []
    rng = random.Random(xxhash.xxh3_64_intdigest(f"split\x1f{seed}\x1f{doc_id}".encode()))
    count = hi - lo + 1
    return sorted(rng.sample(range(lo, hi + 1), min(pairs, count)))


class PairSplitter(PipelineStep):
    name = "split"
    type = "✂️ - SPLITTER"

    def __init__(
        self,
        tokenizer_dir: str,
        tokenizer_id: str,
        *,
        suffix_tokens: int,
        min_prefix_tokens: int,
        max_prefix_tokens: int,
        pairs_per_document: int,
        seed: int,
    ):
        super().__init__()
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer_id = tokenizer_id
        self.suffix_tokens = suffix_tokens
        self.min_prefix_tokens = min_prefix_tokens
        self.max_prefix_tokens = max_prefix_tokens
        self.pairs_per_document = pairs_per_document
        self.seed = seed

    def pairs_of(self, doc: Document, ids: list[int], offsets: list[tuple[int, int]]) -> Iterator[dict]:
        n = self.suffix_tokens
        starts = split_points(
            doc.id, len(ids), seed=self.seed, suffix_tokens=n,
            min_prefix=self.min_prefix_tokens, pairs=self.pairs_per_document,
        )
        if not starts:
            self.stat_update("skipped_too_short")
            return
        meta = dict(doc.metadata)
        source = str(meta.pop("source", ""))
        meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
        for s in starts:
            p0 = max(0, s - self.max_prefix_tokens)
            yield {
                "pair_id": pair_id(doc.id, s, n, self.tokenizer_id),
                "doc_id": doc.id,
                "source": source,
                "prefix": doc.text[offsets[p0][0] : offsets[s][0]],
                "suffix": doc.text[offsets[s][0] : offsets[s + n - 1][1]],
                "prefix_ids": ids[p0:s],
                "suffix_ids": ids[s : s + n],
                "split_offset": s,
                "doc_tokens": len(ids),
                "meta": meta_json,
            }
            self.stat_update("pairs")
            self.stat_update("prefix_tokens", value=s - p0)
            self.stat_update("suffix_tokens", value=n)

    def _flush(self, batch: list[Document]) -> Iterator[dict]:
        encodings = load_tokenizer(self.tokenizer_dir).encode_batch(
            [d.text for d in batch], add_special_tokens=False
        )
        for doc, enc in zip(batch, encodings):
            self.stat_update("document_tokens", value=len(enc.ids))
            yield from self.pairs_of(doc, enc.ids, enc.offsets)
        batch.clear()

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        batch: list[Document] = []
        for doc in data or ():
            batch.append(doc)
            if len(batch) >= _BATCH:
                yield from self._flush(batch)
        if batch:
            yield from self._flush(batch)



@dataclass
class ShardPlan:
    manifest: Manifest
    stage: StageDir
    files: list[CorpusFile]
    tokenizer_dir: Path
    tokenizer_id: str

    @property
    def schema(self) -> pa.Schema:
        m = self.manifest
        prov = provenance(
            stage=STAGE,
            table="pairs",
            manifest_fingerprint=fingerprint(m),
            stage_fingerprint=self.stage.fingerprint,
            models={"policy_tokenizer": {"path": str(self.tokenizer_dir), "sha": self.tokenizer_id}},
            settings={**m.shard.model_dump(), "seed": m.shard_seed, "corpus": m.corpus.model_dump()},
        )
        return with_provenance(PAIRS, prov)

    def pipeline(self) -> list:
        m, c = self.manifest, self.manifest.shard
        return [
            CorpusReader(self.files, text_key=m.corpus.text_key, id_key=m.corpus.id_key),
            PairSplitter(
                str(self.tokenizer_dir), self.tokenizer_id,
                suffix_tokens=c.suffix_tokens, min_prefix_tokens=c.min_prefix_tokens,
                max_prefix_tokens=c.max_prefix_tokens, pairs_per_document=c.pairs_per_document,
                seed=m.shard_seed,
            ),
            TableWriter(str(self.stage.path), self.schema),
        ]


def corpus_files(manifest: Manifest) -> list[CorpusFile]:
    patterns = [
        str(assets.embedded_corpus() / "part-*.jsonl") if p == "embedded" else str(manifest.resolve_path(p))
        for p in manifest.corpus.paths
    ]
    c = manifest.corpus
    return resolve_corpus(patterns, fmt=c.format, text_key=c.text_key, limit=c.limit)


def plan_shard(manifest: Manifest) -> ShardPlan:
    files = corpus_files(manifest)
    tok_dir = policy_tokenizer_dir(manifest)
    tok_id = tokenizer_id(str(tok_dir))
    view = fingerprinted_view(manifest, ("corpus", "policy", "shard", "run.seed"))
    view["policy.tokenizer_sha"] = tok_id
    view["corpus.files"] = hash_view({f.name: [os.path.getsize(f.path), f.max_records] for f in files})
    stage = StageDir(manifest, STAGE, "pairs", view, layout={"executor.tasks": manifest.executor.tasks})
    return ShardPlan(manifest, stage, files, tok_dir, tok_id)


def shard_summary(stage: StageDir, elapsed_s: float | None = None) -> dict:
    pairs = pl.from_arrow(read_table(stage.path, columns=["doc_id", "prefix_ids"]))
    stats = stage.merged_stats()
    prefix_len = pairs["prefix_ids"].list.len() if len(pairs) else pl.Series([0])
    summary = {
        "pairs": len(pairs),
        "documents_read": int(stats.get("documents", 0)),
        "documents_with_pairs": pairs["doc_id"].n_unique() if len(pairs) else 0,
        "skipped": {k.removeprefix("skipped_"): int(v) for k, v in sorted(stats.items()) if k.startswith("skipped_")},
        "document_tokens": int(stats.get("document_tokens", 0)),
        "suffix_tokens": stage.manifest.shard.suffix_tokens,
        "prefix_tokens_mean": round(float(prefix_len.mean()), 1),
        "prefix_tokens_max": int(prefix_len.max()),
    }
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
        summary["documents_per_s"] = round(summary["documents_read"] / elapsed_s, 1)
        summary["tokens_per_s"] = round(summary["document_tokens"] / elapsed_s, 1)
    return summary


def finalize_shard(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    stage = plan_shard(manifest).stage
    notes = ""
    if "embedded" in manifest.corpus.paths:
        notes = (assets.corpus_dir() / "ATTRIBUTION.md").read_text()
    return write_card(stage, shard_summary(stage, elapsed_s), notes)


class FinalizeShard(PipelineStep):
    """One-task pipeline that writes the card once every shard task has finished (Slurm)."""

    name = "card"
    type = "📝 - CARD"

    def __init__(self, manifest: Manifest):
        super().__init__()
        self.manifest = manifest

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        finalize_shard(self.manifest)
        yield from ()


def _missing(stage: StageDir) -> list[int]:
    return sorted(set(range(stage.tasks)) - stage.completed_ranks())


def run_shard(
    manifest: Manifest, *, force: bool = False, dry_run: bool = False, wait: bool = True,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Run (or resume) the shard stage; returns the card when the stage is complete."""
    plan = plan_shard(manifest)
    stage, tasks = plan.stage, manifest.executor.tasks
    if dry_run:
        log(f"shard: {len(plan.files)} corpus files -> {tasks} tasks -> {stage.path}")
        if manifest.executor.type == "slurm":
            executor = make_executor(manifest, plan.pipeline(), logging_dir=stage.logs, job_name=STAGE, tasks=tasks)
            log(sbatch_script(executor))
        return None
    stage.prepare(force=force)
    if stage.is_complete() and (stage.path / "card.json").is_file():
        log(f"shard: already complete ({stage.path}); nothing to do")
        return json.loads((stage.path / "card.json").read_text())
    executor = make_executor(manifest, plan.pipeline(), logging_dir=stage.logs, job_name=STAGE, tasks=tasks)
    if manifest.executor.type == "local":
        started = time.perf_counter()
        executor.run()
        if missing := _missing(stage):
            raise StageFailed(f"shard: tasks {missing} did not finish; see {stage.logs}/logs")
        return finalize_shard(manifest, time.perf_counter() - started)
    card_job = make_executor(
        manifest, [FinalizeShard(manifest)], logging_dir=stage.logs / "card", job_name=f"{STAGE}-card",
        tasks=1, depends=executor,
    )
    card_job.run()
    log(f"shard: submitted Slurm jobs {executor.job_id} (tasks) and {card_job.job_id} (card)")
    if not wait:
        return None
    wait_for_jobs([executor.job_id, card_job.job_id])
    if missing := _missing(stage):
        raise StageFailed(f"shard: Slurm tasks {missing} did not finish; see {stage.logs}/slurm_logs")
    return json.loads((stage.path / "card.json").read_text())
