"""LitGPT checkpoint -> Hugging Face directory that transformers and vLLM load.

The trainer writes LitGPT checkpoints (``lit_model.pth`` + ``model_config.yaml``); vLLM
(rollouts, evaluation) and every other tool want a Hugging Face directory. The weights are
renamed with litgpt's own converter (``copy_weights_llama``, the logic of
``litgpt convert_from_litgpt``); ``config.json`` is built from the LitGPT config here,
because a model trained from a custom config has no Hugging Face config to copy.

Only architectures whose mapping is exact are exported (llama-style: RMSNorm, SwiGLU MLP,
full rotary, no biases); anything else raises :class:`ExportError` naming the config key,
since a silently wrong config would give a model that loads and generates garbage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.errors import SipError

HF_WEIGHTS_FILE = "model.safetensors"
# Tokenizer and chat files a Hugging Face tokenizer may consist of; copied when present.
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


class ExportError(SipError, ValueError):
    """A checkpoint that cannot be exported, naming the file or config key and what was expected."""


# LitGPT config key -> the value the llama mapping requires.
_LLAMA_REQUIREMENTS = {
    "mlp_class_name": "LLaMAMLP",
    "norm_class_name": "RMSNorm",
    "parallel_residual": False,
    "shared_attention_norm": False,
    "bias": False,
    "attn_bias": False,
    "lm_head_bias": False,
    "rotary_percentage": 1.0,
    "rope_interleave": False,
    "rope_condense_ratio": 1,  # LitGPT's position interpolation; not a llama config key
    "rope_indices": None,
    "rope_local_base_freq": None,
    "norm_1": True,
    "norm_2": True,
    "scale_embeddings": False,
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_scores_scalar": None,
    "sliding_window_size": None,
    "latent_attention": None,
    "n_expert": 0,
}


def check_llama_mapping(config, source) -> None:
    """Raise :class:`ExportError` naming ``source`` and the first LitGPT config key whose value
    has no exact Hugging Face llama equivalent."""
    for key, expected in _LLAMA_REQUIREMENTS.items():
        value = getattr(config, key, expected)
        if value != expected:
            raise ExportError(
                f"{source}: {key}={value!r} has no exact Hugging Face mapping here; export supports llama-style "
                f"models ({key} must be {expected!r})"
            )


def _rope_parameters(config, source: Path) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(config.rope_base)}
    adj = config.rope_adjustments
    if not adj:
        return rope
    if {"low_freq_factor", "high_freq_factor"} <= adj.keys() and not {"beta_fast", "beta_slow"} & adj.keys():
        return {**rope, "rope_type": "llama3", "factor": float(adj["factor"]),
                "low_freq_factor": float(adj["low_freq_factor"]), "high_freq_factor": float(adj["high_freq_factor"]),
                "original_max_position_embeddings": int(adj["original_max_seq_len"])}
    if adj.keys() == {"factor"}:
        return {**rope, "rope_type": "linear", "factor": float(adj["factor"])}
    raise ExportError(f"{source}: rope_adjustments {adj!r} not supported (llama3-style or linear 'factor' only)")


def _special_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad ids: from generation_config.json when present (what generation uses), else
    from the tokenizer itself."""
    gen = tokenizer_dir / "generation_config.json"
    if gen.is_file():
        data = json.loads(gen.read_text())
        if data.get("eos_token_id") is not None:
            return {k: data.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    from litgpt.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}


def hf_config(config, dtype: torch.dtype, tie_word_embeddings: bool, special: dict, source: Path) -> dict:
    """The ``config.json`` of a llama-style LitGPT config.

    RoPE is written both as ``rope_parameters`` (transformers 5) and as the older
    ``rope_theta``/``rope_scaling`` keys, so GPU machines with an older transformers under
    their vLLM read the same model.
    """
    check_llama_mapping(config, source)
    rope = _rope_parameters(config, source)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
        **special,
    }


def hf_state_dict(config, lit_weights: dict) -> dict[str, torch.Tensor]:
    """LitGPT weights -> the Hugging Face llama names and layout (what vLLM's loader takes),
    through litgpt's ``copy_weights_llama``. Every tensor is a fresh contiguous copy."""
    from litgpt.scripts.convert_lit_checkpoint import check_conversion_supported, copy_weights_llama

    check_conversion_supported(lit_weights)
    state: dict[str, torch.Tensor] = {}
    copy_weights_llama(config, state, lit_weights)
    # The q/k/v split gives views of one tensor; safetensors stores each tensor on its own.
    return {name: t.detach().contiguous().clone() for name, t in state.items()}


def _load_lit_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExportError(f"{path}: not found; a LitGPT checkpoint directory holds lit_model.pth and model_config.yaml")
    weights = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return weights.get("model", weights)  # fabric.save({"model": ...}) checkpoints nest the weights


def _tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    files = [tokenizer_dir / name for name in HF_TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not any(p.name in ("tokenizer.json", "tokenizer.model") for p in files):
        raise ExportError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model; pass tokenizer_dir= a directory "
                          "with one")
    return files


def write_hf_skeleton(config, out_dir: str | Path, tokenizer_dir: str | Path, dtype: torch.dtype) -> Path:
    """Write ``out_dir``: a Hugging Face directory of a llama-style LitGPT ``config`` *without
    weights* (``config.json``, ``generation_config.json``, tokenizer files).

    vLLM starts from it with ``load_format="dummy"`` and receives the weights by a push
    (:meth:`pipeline.engines.vllm_engine.VLLMEngine.push_weights`): a trainer's sampler never
    writes a checkpoint to disk. The embedding and the output head are declared untied, since a
    trainer updates LitGPT's two tensors separately.

    Raises:
        ExportError: an architecture without an exact mapping, or no tokenizer.
    """
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    source = out_dir / "config.json"
    files = _tokenizer_files(tokenizer_dir)
    special = _special_ids(tokenizer_dir)
    config_json = hf_config(config, dtype, False, special, source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    with atomic_path(out_dir, directory=True) as tmp:
        _write_config_files(tmp, files, special, config_json)
    return out_dir


def _write_config_files(directory: Path, tokenizer_files: list[Path], special: dict, config_json: dict) -> None:
    for path in tokenizer_files:
        shutil.copy2(path, directory / path.name)
    if not (directory / "generation_config.json").is_file():
        (directory / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")


def export_hf(litgpt_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``out_dir``: a Hugging Face directory of the LitGPT checkpoint in ``litgpt_dir``.

    Args:
        litgpt_dir: holds ``lit_model.pth`` (a state dict, or ``{"model": state_dict}``) and
            ``model_config.yaml``.
        out_dir: the Hugging Face directory to write (``config.json``, ``model.safetensors``,
            ``generation_config.json``, tokenizer files and chat template). Built in a
            temporary sibling and renamed into place, so a reader never sees half of it; an
            existing ``out_dir`` is replaced.
        tokenizer_dir: where the tokenizer files come from; default ``litgpt_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ExportError: a missing file, an architecture without an exact mapping, no tokenizer.
    """
    from litgpt import Config

    litgpt_dir, out_dir = Path(litgpt_dir), Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else litgpt_dir
    config_path = litgpt_dir / "model_config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: not found; a LitGPT checkpoint directory holds model_config.yaml")
    config = Config.from_file(config_path)
    check_llama_mapping(config, config_path)
    tokenizer_files = _tokenizer_files(tokenizer_dir)

    state = hf_state_dict(config, _load_lit_weights(litgpt_dir / "lit_model.pth"))
    embed, head = state["model.embed_tokens.weight"], state.get("lm_head.weight")
    tied = head is None or torch.equal(embed, head)
    if tied:
        state.pop("lm_head.weight", None)  # transformers and vLLM re-tie it from the embedding
    special = _special_ids(tokenizer_dir)
    config_json = hf_config(config, embed.dtype, tied, special, config_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)  # of exports that were killed
    with atomic_path(out_dir, directory=True) as tmp:
        from safetensors.torch import save_file

        save_file(state, str(tmp / HF_WEIGHTS_FILE), metadata={"format": "pt"})
        _write_config_files(tmp, tokenizer_files, special, config_json)
    return out_dir
