"""The policy model: a ``litgpt.model.GPT`` built from scratch or loaded from a LitGPT checkpoint.

A LitGPT checkpoint directory holds ``lit_model.pth`` (the state dict) and
``model_config.yaml``; the trainer's own checkpoints are such directories too, so any of them
can start another run (continual pretraining).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from pipeline.errors import SipError
from pipeline.manifest import Manifest, TrainConfig
from pipeline.tokenizer import load_tokenizer

from pipeline.checkpoints import LIT_CONFIG_FILE as CONFIG_FILE, LIT_WEIGHTS_FILE as WEIGHTS_FILE, initial_model_dir


class ModelError(SipError, ValueError):
    """A model reference or config that cannot be used, naming the manifest key."""


def model_config(manifest: Manifest):
    """The ``litgpt.Config`` of the policy, with ``block_size`` covering ``train.max_seq_len``."""
    from litgpt import Config

    train: TrainConfig = manifest.train
    ckpt = initial_model_dir(manifest)
    if ckpt is not None:
        config = Config.from_file(ckpt / CONFIG_FILE)
    elif isinstance(train.model.config, str):
        try:
            config = Config.from_name(train.model.config)
        except ValueError as exc:
            raise ModelError(f"train.model.config: {exc}") from None
    else:
        fields = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(train.model.config) - fields)
        if unknown:
            raise ModelError(f"train.model.config: unknown litgpt.Config field(s) {unknown}; allowed: "
                             f"{', '.join(sorted(fields))}")
        settings = {"block_size": train.max_seq_len, **train.model.config}
        config = Config(**settings)
    if config.block_size < train.max_seq_len:
        raise ModelError(f"train.max_seq_len ({train.max_seq_len}) exceeds the model's block_size "
                         f"({config.block_size}); lower train.max_seq_len")
    return config


def check_vocab(config, tokenizer_dir: Path) -> None:
    """The tables' token ids come from the policy tokenizer: every id must have an embedding."""
    vocab = load_tokenizer(str(tokenizer_dir)).get_vocab_size(with_added_tokens=True)
    if vocab > config.padded_vocab_size:
        raise ModelError(
            f"the policy tokenizer ({tokenizer_dir}) has {vocab} tokens but the model's vocabulary has "
            f"{config.padded_vocab_size} (padded_vocab_size); set train.model.config vocab_size to {vocab}, "
            "or use a model made for this tokenizer"
        )


def build_model(config, seed: int, checkpoint_dir: Path | None):
    """A GPT with LitGPT's pretraining init (seeded) or the checkpoint's weights, on the CPU."""
    from litgpt.model import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    if checkpoint_dir is None:
        _init_weights(model, config)
    else:
        state = torch.load(checkpoint_dir / WEIGHTS_FILE, map_location="cpu", mmap=True, weights_only=True)
        model.load_state_dict(state.get("model", state))
    return model


def _init_weights(model, config) -> None:
    """GPT-NeoX/TinyLlama init, as litgpt's pretraining script does (small output projections)."""
    import math

    from litgpt.model import CausalSelfAttention, LLaMAMLP
    from torch import nn

    std = math.sqrt(2.0 / 5 / config.n_embd)
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, (LLaMAMLP, CausalSelfAttention)):
            nn.init.normal_(module.proj.weight, mean=0.0, std=1 / math.sqrt(config.n_embd) / config.n_layer)


def state_sha(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, values): the identity of a reference model.

    Computed from tensors, not file bytes, so the model in memory and the same weights loaded
    from any checkpoint file hash alike.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
