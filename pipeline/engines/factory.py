"""Building the engine a manifest's model reference names."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.engines.base import Engine
from pipeline.engines.context import Context, model_context, server_context
from pipeline.manifest import Manifest, ManifestError, ModelRef
from pipeline.models import model_fingerprint, resolve_model_dir


# Settings of a model reference that change how it runs, not what it answers: left out of
# stage fingerprints so that, e.g., raising a timeout after failures does not block resume.
RUN_ONLY = ("concurrency", "timeout_s", "max_retries", "api_key_env", "gpu_memory_utilization", "tensor_parallel_size")


def model_identity(manifest: Manifest, ref: ModelRef, key: str) -> dict:
    """What identifies the model's outputs (for provenance and the resume guard), cheaply."""
    if ref.kind == "endpoint":
        return {"kind": "endpoint", "url": ref.model, "served_name": ref.served_name}
    directory = resolve_model_dir(manifest, ref.model, f"{key}.model")
    return {"kind": ref.kind, "path": str(directory), "name": Path(directory).name,
            "weights_sha": model_fingerprint(directory)}


def make_engine(manifest: Manifest, ref: ModelRef, key: str) -> Engine:
    if ref.kind == "endpoint":
        from pipeline.engines.endpoint import EndpointEngine

        if not ref.served_name:
            raise ManifestError(f"{key}.served_name: required for an endpoint (the model name the server expects)")
        if ref.api_key_env and not os.environ.get(ref.api_key_env):
            raise ManifestError(f"{key}.api_key_env: environment variable {ref.api_key_env} is not set")
        return EndpointEngine.from_env_key(
            ref.model, ref.served_name, ref.api_key_env, concurrency=ref.concurrency,
            timeout_s=ref.timeout_s, max_retries=ref.max_retries,
            max_model_len=engine_context(manifest, ref, key).tokens or 0, seed=manifest.run.seed, prefill=ref.prefill,
        )
    from pipeline.engines.vllm_engine import VLLMEngine

    directory = resolve_model_dir(manifest, ref.model, f"{key}.model")
    return VLLMEngine(
        directory, max_model_len=ref.max_model_len, dtype=ref.dtype, seed=manifest.run.seed,
        gpu_memory_utilization=ref.gpu_memory_utilization, tensor_parallel_size=ref.tensor_parallel_size,
        model_id="SmolLM2-135M-Instruct" if ref.kind == "embedded" else Path(directory).name,
    )


def engine_context(manifest: Manifest, ref: ModelRef, key: str) -> Context:
    """The context the engine of ``ref`` will have (:mod:`pipeline.engines.context`); asks an
    endpoint's server when the manifest does not say."""
    if ref.max_model_len is not None:
        return Context(ref.max_model_len, "manifest")
    if ref.kind == "endpoint":
        api_key = os.environ.get(ref.api_key_env) if ref.api_key_env else None
        tokens = server_context(ref.model, ref.served_name, api_key)
        return Context(tokens, "server" if tokens else "unknown")
    tokens = model_context(resolve_model_dir(manifest, ref.model, f"{key}.model"))
    return Context(tokens, "model config" if tokens else "unknown")


def counting_tokenizer(manifest: Manifest, ref: ModelRef, key: str):
    """The tokenizer that counts a model's prompt tokens before any engine starts: a local
    model's own (``tokenizer.json``), an endpoint's stand-in, the policy's."""
    from pipeline.models import policy_tokenizer_dir
    from pipeline.tokenizer import load_tokenizer

    if ref.kind == "endpoint":
        return load_tokenizer(str(policy_tokenizer_dir(manifest)))
    return load_tokenizer(str(resolve_model_dir(manifest, ref.model, f"{key}.model")))
