"""The policy model as a directory vLLM can load (rollouts, and later the online phase).

``policy.model`` is ``embedded``, a Hugging Face directory, or a LitGPT checkpoint directory
(``lit_model.pth`` + ``model_config.yaml``: what the trainer writes). vLLM loads only the
first two, so a LitGPT checkpoint is exported once with :func:`pipeline.export.export_hf`
into the cache, under a key made of the checkpoint's fingerprint: every task and every
re-run reuses it, and a new checkpoint gets a new export.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from pipeline.assets import cache_dir
from pipeline.engines.context import model_context
from pipeline.manifest import Manifest, ManifestError
from pipeline.models import ModelNotFound, model_fingerprint, resolve_model_dir

_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def checkpoint_kind(directory: Path) -> str:
    """``hf`` (weights vLLM loads), ``litgpt`` (needs an export) or raise naming the key."""
    if (directory / "config.json").is_file() and any(any(directory.glob(p)) for p in _HF_WEIGHTS):
        return "hf"
    if (directory / "lit_model.pth").is_file():
        return "litgpt"
    raise ModelNotFound(
        f"policy.model: {directory} is neither a Hugging Face model directory (config.json + *.safetensors) "
        "nor a LitGPT checkpoint (lit_model.pth + model_config.yaml)"
    )


def policy_source(manifest: Manifest) -> tuple[Path, str]:
    """The directory ``policy.model`` names and its kind; cheap (nothing is exported)."""
    directory = resolve_model_dir(manifest, manifest.policy.model, "policy.model")
    return directory, checkpoint_kind(directory)


def policy_identity(manifest: Manifest) -> dict:
    """What identifies the policy's outputs (provenance and the resume guard)."""
    directory, kind = policy_source(manifest)
    name = "SmolLM2-135M-Instruct" if manifest.policy.model == "embedded" else directory.name
    return {"kind": kind, "path": str(directory), "name": name, "weights_sha": model_fingerprint(directory)}


def check_context(manifest: Manifest) -> None:
    """Refuse a ``rollouts.max_model_len`` over the policy's context before any engine starts
    (vLLM would refuse it at start-up, in every task)."""
    directory, _ = policy_source(manifest)
    context = model_context(directory)
    if context is not None and manifest.rollouts.max_model_len is not None and manifest.rollouts.max_model_len > context:
        raise ManifestError(
            f"rollouts.max_model_len: {manifest.rollouts.max_model_len} is more than the policy's context "
            f"({context} tokens, {directory}); set rollouts.max_model_len to at most {context}"
        )


def exported_dir(checkpoint: Path) -> Path:
    return cache_dir() / "policy-hf" / model_fingerprint(checkpoint)


def policy_hf_dir(manifest: Manifest) -> Path:
    """A Hugging Face directory of the policy, exporting a LitGPT checkpoint on first use."""
    directory, kind = policy_source(manifest)
    if kind == "hf":
        return directory
    tokenizer = (resolve_model_dir(manifest, manifest.policy.tokenizer, "policy.tokenizer")
                 if manifest.policy.tokenizer else None)
    return cached_hf_export(directory, exported_dir(directory), tokenizer)


def cached_hf_export(directory: Path, target: Path, tokenizer_dir: Path | None = None) -> Path:
    """``target``: the LitGPT checkpoint ``directory`` exported for Hugging Face and vLLM, unless
    an earlier export is there (``target`` names the checkpoint's identity, so it is never stale).

    A lock file serialises tasks that start together: the first exports, the others wait and
    reuse it (an export replaced while another task's engine loads it would break that load).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # export_hf renames a finished export into place
            return target
        from pipeline.export import export_hf

        return export_hf(directory, target, tokenizer_dir=tokenizer_dir)
