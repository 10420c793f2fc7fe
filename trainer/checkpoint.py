"""Training checkpoints: atomic, self-contained LitGPT directories plus the training state.

A checkpoint ``<train>/checkpoints/step-00000120/`` holds

- ``lit_model.pth`` (the model's state dict) and ``model_config.yaml``: a LitGPT checkpoint
  directory that litgpt, ``train.model.init`` and the HF export accept as is;
- the policy tokenizer's files, so the directory is usable on its own;
- ``train_state.pt``: optimizer, scheduler, RNG states and the loop state (phase, steps, data
  position, reference-model hash); ``train_state.json``: the loop state, readable.

It is written in a hidden temporary directory and renamed into place (:mod:`pipeline.atomic`),
so a crash never leaves a half checkpoint that looks complete; the oldest are deleted beyond
``keep_last``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from trainer.model import WEIGHTS_FILE

TRAIN_STATE_FILE = "train_state.pt"  # optimizer, scheduler, RNG and loop states
LOOP_STATE_FILE = "train_state.json"  # the loop state alone, readable
# The policy tokenizer's files a checkpoint carries, so that it is usable on its own.
CHECKPOINT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                              "generation_config.json", "chat_template.jinja")
CHECKPOINT_PREFIX = "step-"


def checkpoint_name(global_step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{global_step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary dir never matches: it starts with a dot)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAIN_STATE_FILE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def full_state_dicts(fabric, model, optimizer) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state dicts; under FSDP every rank must call this."""
    if fabric.world_size == 1:
        return model.module.state_dict(), optimizer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model._forward_module, optimizer.optimizer, options=options)


def load_model_state(fabric, model, model_state: dict) -> None:
    """Load a whole (unsharded) state dict into the Fabric model; under FSDP on every rank."""
    if fabric.world_size == 1:
        model.module.load_state_dict(model_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model._forward_module, model_state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(fabric, model, optimizer, optim_state: dict) -> None:
    """Inverse of the optimizer half of :func:`full_state_dicts`."""
    if fabric.world_size == 1:
        optimizer.optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model._forward_module, optimizer.optimizer, optim_state,
                             options=StateDictOptions(full_state_dict=True))


def save_checkpoint(fabric, root: Path, *, model, optimizer, scheduler, loop_state: dict, config,
                    tokenizer_dir: Path, keep_last: int) -> Path:
    """Write ``root/step-N`` atomically (rank 0 writes; all ranks gather) and prune old ones."""
    from litgpt.utils import save_config

    model_state, optim_state = full_state_dicts(fabric, model, optimizer)
    final = root / checkpoint_name(loop_state["global_step"])
    if fabric.global_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(final, directory=True) as tmp:  # the same step saved before a crash is replaced whole
            torch.save(model_state, tmp / WEIGHTS_FILE)
            save_config(config, tmp)
            for name in CHECKPOINT_TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
            torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng_states(),
                        "loop": loop_state}, tmp / TRAIN_STATE_FILE)
            (tmp / LOOP_STATE_FILE).write_text(json.dumps(loop_state, indent=1, sort_keys=True) + "\n")
            _fsync_dir(tmp)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    fabric.barrier()
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model state dict, training state) of a checkpoint directory."""
    model_state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    state = torch.load(path / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    return model_state, state


def publish_final(checkpoint: Path, final: Path) -> Path:
    """Copy the last checkpoint to ``final`` (atomically: copy beside it, then rename)."""
    with atomic_path(final, directory=True) as tmp:
        shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
    return final


def save_model(state: dict, config, tokenizer_dir: Path, target: Path, about: dict) -> Path:
    """``target``: a LitGPT directory of ``state`` (a model state dict) with its config, the
    tokenizer files and ``about`` as ``train_state.json`` (what it is: it makes the directory's
    fingerprint differ from another model's of the same shapes). Written atomically."""
    from litgpt.utils import save_config

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, directory=True) as tmp:
        torch.save(state, tmp / WEIGHTS_FILE)
        save_config(config, tmp)
        for name in CHECKPOINT_TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        (tmp / LOOP_STATE_FILE).write_text(json.dumps(about, indent=1, sort_keys=True) + "\n")
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

