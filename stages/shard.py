"""Shard stage: cut each document into (prefix, suffix) pairs of policy tokens.

For every document the splitter tokenizes the whole text, draws ``pairs_per_document``
distinct split points from an RNG seeded by (seed, doc id) (so the same document always
splits the same way, whatever task reads it), and emits, per split point ``s``:

- ``suffix_ids = ids[s : s + N]`` (exactly N tokens),
- ``prefix_ids = ids[max(0, s - max_prefix) : s]`` (at least ``min_prefix`` tokens),
- ``prefix`` / ``suffix``: the document's own characters covered by those tokens (from the
  tokenizer's offsets, so no decode artefacts; prefix + suffix is a substring of the text).
  The prefix ends where its last token ends: characters no token covers (the spaces a
  WordPiece tokenizer drops) belong to the suffix, as they do in the text of every
  continuation the policy writes (``pipeline.tokenizer.decode_continuation``). The suffix's
  ids are its text's encoding as a continuation of the prefix
  (``pipeline.tokenizer.encode_continuation``): cut at token boundaries, the window encodes
  as it did inside the document.

Split points, the suffix's end and the prefix's start are only placed where a token starts a
new character:
a byte-level tokenizer may spread one character (an emoji, a CJK glyph) over several tokens,
and cutting between them would leave the text and the ids disagreeing.

Documents shorter than ``min_prefix + N`` tokens are skipped and counted.

With ``shard.eval_fraction`` > 0 a share of the documents is held out for evaluation, chosen by
a hash of (seed, document id) (``stages/heldout.py``): their pairs, cut the same way, go to
the held-out table ``<stage>/heldout/`` (one file per task, provenance table ``heldout``) and
never to the pairs table, which every later stage and the trainer read. The trainer refuses a
phase whose table is the held-out one.

Document ids must be unique across the corpus: every task records the ids it read under
``<stage>/_doc_ids/`` and the stage is refused before its card is written (so no later stage
starts) when one id occurs twice, in one file or in files that different tasks read.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
import xxhash
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from loguru import logger

from pipeline import assets
from pipeline.cards import write_card
from pipeline.corpus import CorpusFile, CorpusReader, resolve_corpus, unrecognised_files
from pipeline.doc_ids import check_unique_doc_ids
from pipeline.io import TableWriter
from pipeline.manifest import Manifest, fingerprint, fingerprinted_view, hash_view
from pipeline.models import policy_tokenizer_dir
from pipeline.plans import planned
from pipeline.schema import HELDOUT, HELDOUT_TABLE, PAIRS, pair_id, provenance, with_provenance
from pipeline.runner import StageJob
from pipeline.stage import StageDir
from pipeline.tokenizer import char_boundaries, load_tokenizer, tokenizer_id
from stages.heldout import HELDOUT_DIR, HeldOutSplit, heldout_summary

STAGE = "shard"
UPSTREAMS: tuple[str, ...] = ()  # the stages whose tables this one reads (pipeline.app.registry)

_BATCH_DOCS = 64  # documents per batch-encode call: enough for the Rust tokenizer to parallelise
_BATCH_CHARS = 4_000_000  # ...but fewer when documents are huge, to bound memory (ids + offsets)
DOC_IDS_DIR = "_doc_ids"  # in the stage directory: each task's (doc_id, file, line) rows
_IGNORED_NAMED = 20  # the card names this many ignored files (and counts them all)


def split_points(
    doc_id: str, boundaries: list[bool], *, seed: int, suffix_tokens: int, min_prefix: int, pairs: int
) -> list[int]:
    """Sorted, distinct suffix start offsets for a document; empty if it is too short.

    ``boundaries`` has one entry per token plus one for the end of the document; a start ``s``
    is allowed when both ``s`` and ``s + suffix_tokens`` are character boundaries. The RNG is
    seeded by (seed, doc id) only, so a document splits the same way in any task.
    """
    n_tokens = len(boundaries) - 1
    lo, hi = min_prefix, n_tokens - suffix_tokens
    if hi < lo:
        return []
    allowed = [s for s in range(lo, hi + 1) if boundaries[s] and boundaries[s + suffix_tokens]]
    rng = random.Random(xxhash.xxh3_64_intdigest(f"split\x1f{seed}\x1f{doc_id}".encode()))
    return sorted(rng.sample(allowed, min(pairs, len(allowed))))


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
        bounds = char_boundaries(offsets)
        starts = split_points(
            doc.id, bounds, seed=self.seed, suffix_tokens=n,
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
            while not bounds[p0]:  # never start the prefix inside a character
                p0 += 1
            yield {
                "pair_id": pair_id(doc.id, s, n, self.tokenizer_id),
                "doc_id": doc.id,
                "source": source,
                "prefix": doc.text[offsets[p0][0] : offsets[s - 1][1]],
                "suffix": doc.text[offsets[s - 1][1] : offsets[s + n - 1][1]],
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
        chars = 0
        for doc in data or ():
            batch.append(doc)
            chars += len(doc.text)
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                yield from self._flush(batch)
                chars = 0
        if batch:
            yield from self._flush(batch)


@dataclass
class ShardPlan:
    manifest: Manifest
    stage: StageDir
    files: list[CorpusFile]
    tokenizer_dir: Path
    tokenizer_id: str

    def _provenance(self, table: str) -> dict:
        m = self.manifest
        return provenance(
            stage=STAGE,
            table=table,
            manifest_fingerprint=fingerprint(m),
            stage_fingerprint=self.stage.fingerprint,
            models={"policy_tokenizer": {"path": str(self.tokenizer_dir), "sha": self.tokenizer_id}},
            settings={**m.shard.model_dump(), "seed": m.shard_seed, "corpus": m.corpus.model_dump()},
        )

    @property
    def schema(self) -> pa.Schema:
        return with_provenance(PAIRS, self._provenance("pairs"))

    @property
    def heldout_schema(self) -> pa.Schema:
        return with_provenance(HELDOUT, self._provenance(HELDOUT_TABLE))

    @property
    def heldout_path(self) -> Path:
        """The held-out table's directory (written only when ``shard.eval_fraction`` > 0)."""
        return self.stage.path / HELDOUT_DIR

    def pipeline(self) -> list:
        m, c = self.manifest, self.manifest.shard
        split = [HeldOutSplit(str(self.heldout_path), self.heldout_schema, fraction=c.eval_fraction,
                              seed=m.shard_seed)] if c.eval_fraction > 0 else []
        return [
            CorpusReader(self.files, text_key=m.corpus.text_key, id_key=m.corpus.id_key,
                         doc_ids_dir=str(self.stage.path / DOC_IDS_DIR)),
            PairSplitter(
                str(self.tokenizer_dir), self.tokenizer_id,
                suffix_tokens=c.suffix_tokens, min_prefix_tokens=c.min_prefix_tokens,
                max_prefix_tokens=c.max_prefix_tokens, pairs_per_document=c.pairs_per_document,
                seed=m.shard_seed,
            ),
            *split,
            TableWriter(str(self.stage.path), self.schema),
        ]


def corpus_patterns(manifest: Manifest) -> list[str]:
    """``corpus.paths`` as paths and globs (``embedded``: the demo corpus's files)."""
    return [
        str(assets.embedded_corpus() / "part-*.jsonl") if p == "embedded" else str(manifest.resolve_path(p))
        for p in manifest.corpus.paths
    ]


def corpus_files(manifest: Manifest) -> list[CorpusFile]:
    c = manifest.corpus
    return resolve_corpus(corpus_patterns(manifest), fmt=c.format, text_key=c.text_key, limit=c.limit)


def plan_shard(manifest: Manifest) -> ShardPlan:
    """The shard stage's plan: the corpus resolved, the tokenizer hashed; made once per
    invocation (:func:`pipeline.plans.planned`), however many later stages ask for it."""
    return planned(STAGE, manifest, lambda: _plan_shard(manifest))


def _plan_shard(manifest: Manifest) -> ShardPlan:
    files = corpus_files(manifest)
    tok_dir = policy_tokenizer_dir(manifest)
    tok_id = tokenizer_id(str(tok_dir))
    view = fingerprinted_view(manifest, ("corpus", "policy", "shard", "run.seed"))
    view["policy.tokenizer_sha"] = tok_id
    view["corpus.files"] = hash_view({f.name: [os.path.getsize(f.path), f.max_records] for f in files})
    tasks = manifest.executor.for_stage(STAGE).tasks
    stage = StageDir(manifest, STAGE, "pairs", view, layout={"executor.tasks": tasks})
    return ShardPlan(manifest, stage, files, tok_dir, tok_id)


def shard_summary(stage: StageDir, elapsed_s: float | None = None) -> dict:
    stats = stage.merged_stats()
    # Lazily over the files: the card job must not need memory in proportion to the table.
    lengths = (
        pl.scan_parquet(str(stage.path / "*.parquet"))
        .select(
            pl.len().alias("pairs"),
            pl.col("doc_id").n_unique().alias("documents"),
            pl.col("prefix_ids").list.len().mean().alias("prefix_mean"),
            pl.col("prefix_ids").list.len().max().alias("prefix_max"),
        )
        .collect()
        .row(0, named=True)
    )
    summary = {
        "pairs": lengths["pairs"],
        "documents_read": int(stats.get("documents", 0)),
        "documents_with_pairs": lengths["documents"],
        "skipped": {k.removeprefix("skipped_"): int(v) for k, v in sorted(stats.items()) if k.startswith("skipped_")},
        "document_tokens": int(stats.get("document_tokens", 0)),
        "suffix_tokens": stage.manifest.shard.suffix_tokens,
        "prefix_tokens_mean": round(float(lengths["prefix_mean"] or 0), 1),
        "prefix_tokens_max": int(lengths["prefix_max"] or 0),
    }
    if stage.manifest.shard.eval_fraction:
        summary.update(heldout_summary(stage.path / HELDOUT_DIR, stage.manifest.shard.eval_fraction))
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
        summary["documents_per_s"] = round(summary["documents_read"] / elapsed_s, 1)
        summary["tokens_per_s"] = round(summary["document_tokens"] / elapsed_s, 1)
    return summary


def ignored_files_summary(manifest: Manifest) -> dict:
    """The files in corpus directories that were not read (unknown extension): counted, the
    first few named, and logged, so a data file in a format sip does not read is noticed."""
    ignored = unrecognised_files(corpus_patterns(manifest), manifest.corpus.format)
    if ignored:
        more = f" and {len(ignored) - _IGNORED_NAMED} more" if len(ignored) > _IGNORED_NAMED else ""
        logger.warning(f"shard: {len(ignored)} files in the corpus directories were not read (their extension is "
                       f"not a corpus format; set corpus.format to read them): "
                       f"{', '.join(ignored[:_IGNORED_NAMED])}{more}")
    return {"ignored_files": len(ignored), "ignored_file_names": ignored[:_IGNORED_NAMED]}


def finalize_shard(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    """Check the tasks' outputs together, then write the card (which marks the stage complete).

    Raises:
        DuplicateDocumentId: a document id occurs twice in the corpus; no card is written, so
            no later stage (and no LLM call) starts on these pairs.
    """
    stage = plan_shard(manifest).stage
    check_unique_doc_ids(stage.path / DOC_IDS_DIR)
    notes = ""
    if "embedded" in manifest.corpus.paths:
        notes = (assets.corpus_dir() / "ATTRIBUTION.md").read_text()
    summary = {**shard_summary(stage, elapsed_s), **ignored_files_summary(manifest)}
    if manifest.shard.eval_fraction:
        notes = (f"The held-out split (shard.eval_fraction {manifest.shard.eval_fraction}) is in `{HELDOUT_DIR}/`: "
                 "the pairs of the documents kept for evaluation; no training phase reads it.\n\n" + notes)
    return write_card(stage, summary, notes)


def shard_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_shard(manifest)
    return StageJob(plan.stage, plan.pipeline(), partial(finalize_shard, manifest))


def summary_line(card: dict) -> str:
    """The one line ``sip`` prints for a finished shard stage (its card's summary)."""
    s = card["summary"]
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    rate = f" in {s['elapsed_s']} s ({s['documents_per_s']} docs/s, {s['tokens_per_s']:.0f} tokens/s)" if "elapsed_s" in s else ""
    ignored = f"; ignored files (not a corpus format): {s['ignored_files']}" if s.get("ignored_files") else ""
    heldout = (f"; held out for evaluation: {s['heldout_pairs']} pairs from {s['heldout_documents']} documents"
               if "heldout_pairs" in s else "")
    return (f"shard: {s['pairs']} pairs from {s['documents_read']} documents{rate}; skipped: {skipped}{ignored}"
            f"{heldout}")
