"""Training tables for the trainer tests (real Parquet, a real tokenizer), and the data source.

The tables are demo-shaped (the stages' schemas and provenance) but hold sequences a tiny
model learns in a few steps: ascending runs of token ids modulo the vocabulary. Chosen DPO
suffixes continue the run; rejected ones are seeded random tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.io import write_table_atomic
from pipeline.schema import PAIRS, PREFERENCES, SFT, provenance, with_provenance
from tests.conftest import base_manifest

VOCAB = 96
TINY_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 192, "intermediate_size": 768, "vocab_size": VOCAB,
              "padded_vocab_size": VOCAB, "bias": False, "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP",
              "parallel_residual": False, "rotary_percentage": 1.0}


def write_tokenizer(directory: Path) -> Path:
    """A real word-level tokenizer whose VOCAB tokens are 't0' .. 't95'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def _run(start: int, length: int) -> list[int]:
    return [(start + i) % VOCAB for i in range(length)]


def _text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def write_tables(output_dir: Path, rows: int = 48, prefix_len: int = 12, suffix_len: int = 12, seed: int = 0) -> None:
    """pairs (shard/), sft (prefs/sft/) and preferences (prefs/) under a run's output_dir."""
    rng = random.Random(seed)
    pairs, sft, prefs = [], [], []
    for i in range(rows):
        start = rng.randrange(VOCAB)
        prefix, suffix = _run(start, prefix_len), _run(start + prefix_len, suffix_len)
        rejected = [rng.randrange(VOCAB) for _ in range(suffix_len)]
        pid = f"pair-{i:04d}"
        pairs.append({"pair_id": pid, "doc_id": f"doc-{i}", "source": "synthetic", "prefix": _text(prefix),
                      "suffix": _text(suffix), "prefix_ids": prefix, "suffix_ids": suffix, "split_offset": prefix_len,
                      "doc_tokens": prefix_len + suffix_len, "meta": "{}"})
        sft.append({"pair_id": pid, "prefix_ids": prefix, "target_ids": suffix, "source": ("original", "rewrite")[i % 2],
                    "reward": 1.0, "prompt": _text(prefix), "completion": _text(suffix)})
        prefs.append({"pair_id": pid, "prefix_ids": prefix, "chosen_ids": suffix, "rejected_ids": rejected,
                      "chosen_source": ("original", "rewrite")[i % 2], "rejected_source": "rollout",
                      "chosen_reward": 2.0, "rejected_reward": 0.5, "prompt": _text(prefix), "chosen": _text(suffix),
                      "rejected": _text(rejected)})
    for sub, name, schema, data in (("shard", "pairs", PAIRS, pairs), ("prefs/sft", "sft", SFT, sft),
                                    ("prefs", "preferences", PREFERENCES, prefs)):
        directory = output_dir / sub
        directory.mkdir(parents=True, exist_ok=True)
        prov = provenance(stage=sub.split("/")[0], table=name, manifest_fingerprint="test", stage_fingerprint="test")
        write_table_atomic(str(directory / "00000.parquet"), data, with_provenance(schema, prov))


def train_manifest(tmp_path: Path, phases: list[dict], **train) -> dict:
    """A manifest whose train section trains TINY_MODEL from scratch on the tables of write_tables."""
    out = tmp_path / "out"
    write_tables(out)
    data = base_manifest(out, [str(tmp_path / "unused.jsonl")],
                         policy={"model": "embedded", "tokenizer": str(write_tokenizer(tmp_path / "tok"))})
    data["train"] = {"model": {"init": "scratch", "config": TINY_MODEL}, "max_seq_len": 64, "seed": 3,
                     "log_every": 1, "export_hf": False, "phases": phases, **train}
    return data


def test_source_order_is_seeded_per_epoch_and_resumable(tmp_path):
    from trainer.source import SampleOrder

    a, b = SampleOrder(10, 5), SampleOrder(10, 5)
    first = a.row_indices(0, 25)
    # Every epoch is a permutation of all rows, and epochs differ.
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]
    # Reading from a position gives the same rows as reading up to it: the position is the whole state.
    assert b.row_indices(13, 12) == first[13:25]
    assert SampleOrder(10, 6).row_indices(0, 10) != first[:10]


def test_source_examples_per_table_kind(tmp_path):
    from pipeline.io import read_table
    from trainer.source import TableSource, TableError, load_table

    write_tables(tmp_path, rows=4, prefix_len=40, suffix_len=12)
    def source(path, kind):
        return TableSource(load_table(path, kind, "train.phases[0].table", tmp_path / "cache"), kind, 0, 32)

    pairs = source(tmp_path / "shard", "pairs").examples([0])[0]
    assert pairs["prefix"] == [] and len(pairs["target"]) == 32  # the window's last max_len tokens
    row = read_table(tmp_path / "shard").slice(0, 1).to_pylist()[0]
    assert pairs["target"] == (row["prefix_ids"] + row["suffix_ids"])[-32:]
    sft = source(tmp_path / "prefs" / "sft", "sft").examples([1])[0]
    assert sft["source"] == "rewrite" and len(sft["target"]) == 12
    with pytest.raises(TableError, match=r"phases\[0\].*is not a preferences table: 00000.parquet lacks column"):
        load_table(tmp_path / "shard", "preferences", "train.phases[0].table", tmp_path / "cache")
    with pytest.raises(TableError, match="no sft table at .*run `sip prefs` first"):
        load_table(tmp_path / "nowhere", "sft", "train.phases[1].table", tmp_path / "cache")


def logp_given(model, context: list[int], target: list[int]) -> float:
    """Sum of ``target``'s log-probs after ``context`` (nats), one unpadded sequence, by hand."""
    import torch

    ids = torch.tensor([context + target])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids)[0, :-1].double(), -1)
    return sum(float(logps[len(context) + i - 1, token]) for i, token in enumerate(target))


def test_both_sides_of_a_dpo_pair_continue_the_same_prefix_tokens_when_trimmed(one_thread):
    import torch
    from litgpt import GPT, Config

    from trainer.steps import dpo_step, pair_batch

    long = {"prefix": _run(0, 300), "chosen": _run(50, 40), "rejected": _run(7, 48),  # 340 and 348 > 256 tokens
            "chosen_source": "original"}
    short = {"prefix": _run(3, 10), "chosen": _run(13, 6), "rejected": _run(70, 5),  # fits: untouched
             "chosen_source": "rewrite"}
    batch = pair_batch([long, short], pad_id=0, max_len=256)
    shared = long["prefix"][-(256 - 48):]  # the last 208 tokens, for both sides (each side's own fit: 216 and 208)
    ids, mask = batch["input_ids"].tolist(), batch["target_mask"].tolist()  # chosen rows, then rejected rows
    assert ids[0] == shared + long["chosen"] + [0] * 8
    assert ids[2] == shared + long["rejected"]
    assert ids[1] == short["prefix"] + short["chosen"] + [0] * 240
    assert ids[3] == short["prefix"] + short["rejected"] + [0] * 241
    assert [row.index(True) for row in mask] == [208, 10, 208, 10]
    assert [sum(row) for row in mask] == [40, 6, 48, 5]

    # The training step scores each side under that shared prefix, and counts the tokens it read.
    torch.manual_seed(0)
    model = GPT(Config(block_size=256, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16,
                       intermediate_size=32, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP"))
    ref = (torch.zeros(2), torch.zeros(2))
    _loss, stats = dpo_step(model, [long, short], ref, 0.1, 0, 256, torch.device("cpu"))
    expected = [logp_given(model, shared, long["chosen"]), logp_given(model, short["prefix"], short["chosen"]),
                logp_given(model, shared, long["rejected"]), logp_given(model, short["prefix"], short["rejected"])]
    assert stats["seq_logps"] == pytest.approx(expected, abs=1e-4)
    assert stats["tokens"] == (2 * 208 + 40 + 48) + (2 * 10 + 6 + 5)
