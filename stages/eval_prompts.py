"""The evaluation's prompts (METHOD.md "Evaluation"): what every checkpoint continues.

Three sets, sizes from the manifest's ``eval`` section:

- ``heldout``: the first ``eval.heldout_prompts`` pairs of the shard stage's held-out table (by
  pair id, so the choice does not depend on task layout), documents no training phase read.
  Each has a reference, its true suffix, for factuality and perplexity.
- ``unsafe``: the first ``eval.unsafe_prompts`` RealToxicityPrompts 'challenging' prefixes
  that the embedded corpus leaves out (:func:`pipeline.assets.unsafe_eval_prompts`), for safety.
  No reference.
- ``mc``: ``eval.mc_questions`` MMLU questions spread over the evals wheel's sample
  (:func:`pipeline.assets.mmlu_sample`); the reference is the right letter. Answered, not
  continued: the checkpoint's most probable next letter.

Every prompt is a row ``{prompt_id, prompt_set, prefix, prefix_ids, reference, reference_ids}``
with ids of the policy tokenizer (what the shard stage cut the pairs with).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.assets import mmlu_sample, unsafe_eval_prompts
from pipeline.io import read_table, table_files
from pipeline.manifest import Manifest, ManifestError
from pipeline.schema import content_id
from pipeline.stage import StageFailed
from pipeline.tokenizer import load_tokenizer
from stages.heldout import HELDOUT_DIR

PROMPT_SETS = ("heldout", "unsafe", "mc")
MC_LETTERS = ("A", "B", "C", "D")


def heldout_prompts(shard_dir: Path, n: int) -> list[dict]:
    """The first ``n`` held-out pairs by pair id, as prompts.

    Raises:
        StageFailed: the shard stage held nothing out (``shard.eval_fraction`` is 0) or has not run.
    """
    path = shard_dir / HELDOUT_DIR
    if not table_files(path) or not (shard_dir / "card.json").is_file():
        raise StageFailed(f"eval.heldout_prompts: no held-out table at {path}; set shard.eval_fraction > 0 and run "
                          "the shard stage (the held-out documents must be kept from training when it cuts the pairs)")
    table = read_table(path, columns=["pair_id", "prefix", "prefix_ids", "suffix", "suffix_ids"]).sort_by("pair_id")
    return [{"prompt_id": r["pair_id"], "prompt_set": "heldout", "prefix": r["prefix"], "prefix_ids": r["prefix_ids"],
             "reference": r["suffix"], "reference_ids": r["suffix_ids"]} for r in table.slice(0, n).to_pylist()]


def unsafe_prompts(tokenizer_dir: Path, n: int) -> list[dict]:
    """The first ``n`` unsafe prefixes, encoded as the shard stage encodes documents (no special tokens)."""
    rows = unsafe_eval_prompts(log=lambda _m: None)
    if n > len(rows):
        raise ManifestError(f"eval.unsafe_prompts: {n} asked, the built-in set has {len(rows)}")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    return [{"prompt_id": content_id("eval-prompt", r["id"]), "prompt_set": "unsafe", "prefix": r["text"],
             "prefix_ids": tokenizer.encode(r["text"], add_special_tokens=False).ids, "reference": None,
             "reference_ids": []} for r in rows[:n]]


def mc_prompts(tokenizer_dir: Path, n: int) -> list[dict]:
    """``n`` questions of the MMLU sample, every ``len // n``-th (the file runs subject by subject:
    its first questions would be a few subjects only), encoded as the shard stage encodes documents."""
    rows = mmlu_sample(log=lambda _m: None)
    if n > len(rows):
        raise ManifestError(f"eval.mc_questions: {n} asked, the MMLU sample has {len(rows)}")
    rows = rows[:: len(rows) // n][:n]
    tokenizer = load_tokenizer(str(tokenizer_dir))
    return [{"prompt_id": content_id("eval-prompt", r["id"]), "prompt_set": "mc", "prefix": r["question"],
             "prefix_ids": tokenizer.encode(r["question"], add_special_tokens=False).ids, "reference": r["answer"],
             "reference_ids": []} for r in rows[:n]]


def eval_prompts(manifest: Manifest, shard_dir: Path, tokenizer_dir: Path) -> list[dict]:
    """Every prompt of the evaluation, held-out first, in a fixed order."""
    cfg = manifest.eval
    out = heldout_prompts(shard_dir, cfg.heldout_prompts) if cfg.heldout_prompts else []
    if cfg.unsafe_prompts:
        out += unsafe_prompts(tokenizer_dir, cfg.unsafe_prompts)
    if cfg.mc_questions:
        out += mc_prompts(tokenizer_dir, cfg.mc_questions)
    if not out:
        raise StageFailed(f"eval: no prompts (the held-out table at {shard_dir / HELDOUT_DIR} is empty): raise "
                          "shard.eval_fraction or eval.unsafe_prompts")
    return out
