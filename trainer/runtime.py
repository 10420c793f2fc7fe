"""Lightning Fabric for the manifest's devices, precision and strategy, and the policy on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.manifest import Manifest
from pipeline.models import policy_tokenizer_dir
from pipeline.checkpoints import initial_model_dir
from trainer.model import ModelError, build_model, check_vocab, model_config

PAD_ID = 0  # any id works: padding sits after every real token and no loss counts it


def several_devices(manifest: Manifest) -> bool:
    t = manifest.train
    if t.num_nodes > 1:
        return True
    if t.devices == "auto":
        return torch.cuda.device_count() > 1
    return t.devices > 1


def make_fabric(manifest: Manifest, loggers: list | None = None):
    """A Fabric; strategy ``auto`` is FSDP (one LitGPT block per unit) when there are several devices."""
    import lightning as L

    t = manifest.train
    strategy = t.strategy
    if strategy == "auto" and several_devices(manifest):
        strategy = "fsdp"
    if strategy == "fsdp":
        if not torch.cuda.is_available():
            raise ModelError("train.strategy: fsdp needs CUDA GPUs (PyTorch FSDP does not run on CPU); use ddp or auto")
        from lightning.fabric.strategies import FSDPStrategy
        from litgpt.model import Block

        # Full state dicts: checkpoints stay plain LitGPT files, whatever the device count.
        strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD")
    return L.Fabric(accelerator="auto", devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
                    precision=t.precision, loggers=loggers or [])


@dataclass
class Policy:
    model: object  # the Fabric-wrapped GPT
    config: object  # litgpt.Config
    tokenizer_dir: Path
    params: int


def setup_policy(fabric, manifest: Manifest, *, load_init: bool = True) -> Policy:
    """Build the GPT (seeded) with the init checkpoint's weights unless ``load_init`` is False
    (a resumed run replaces them anyway), check the vocabulary and hand the model to Fabric."""
    config = model_config(manifest)
    tokenizer_dir = policy_tokenizer_dir(manifest)
    check_vocab(config, tokenizer_dir)
    init_dir = initial_model_dir(manifest) if load_init else None
    model = build_model(config, manifest.train_seed, init_dir)
    params = sum(p.numel() for p in model.parameters())
    return Policy(fabric.setup_module(model), config, tokenizer_dir, params)


def full_model_state(fabric, model) -> dict[str, torch.Tensor]:
    """The whole state dict on every rank's CPU (FSDP gathers the shards)."""
    if fabric.world_size == 1:
        return model.module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model._forward_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
