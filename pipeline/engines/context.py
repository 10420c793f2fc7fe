"""How many tokens (prompt + output) an engine takes: its context, before any engine starts.

A manifest's ``max_model_len`` set: that. Unset (the default): a local model's own context,
from its config (vLLM then starts with ``max_model_len=-1``, its auto-fit: the model's
context, lowered to what the KV cache memory holds), or what an endpoint's server reports.
The fit check (:mod:`stages.fit`) and the engines read it from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

# Config keys that give a Hugging Face model's context, in the order transformers' families use them.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context(directory: str | Path) -> int | None:
    """The longest sequence the model in ``directory`` was built for: a Hugging Face config's
    ``max_position_embeddings`` (or its family's name for it; a multimodal config's
    ``text_config``), a LitGPT checkpoint's ``block_size``; None when its config does not say."""
    directory = Path(directory)
    config = directory / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for section in (data, data.get("text_config") or {}):
            for key in _CONTEXT_KEYS:
                if isinstance(section.get(key), int) and section[key] > 0:
                    return section[key]
        return None
    lit = directory / "model_config.yaml"
    if lit.is_file():
        value = (yaml.safe_load(lit.read_text()) or {}).get("block_size")
        return int(value) if value else None
    return None


def server_context(base_url: str, served_name: str | None, api_key: str | None = None,
                   timeout_s: float = 5.0) -> int | None:
    """The context an OpenAI-compatible server reports for ``served_name`` (vLLM's
    ``/v1/models`` gives ``max_model_len``); None when it reports none or does not answer."""
    import httpx

    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    try:
        response = httpx.get(f"{url}/models", timeout=timeout_s,
                             headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        models = response.json().get("data") or [] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    for model in models:
        if isinstance(model, dict) and (served_name is None or model.get("id") == served_name):
            value = model.get("max_model_len")
            return int(value) if isinstance(value, int) and value > 0 else None
    return None


@dataclass(frozen=True)
class Context:
    """An engine's context and where the number comes from (said in fit reports)."""

    tokens: int | None  # None: unknown (an endpoint that reports none)
    source: str  # "manifest" | "model config" (vLLM may lower it to what its KV cache holds) | "server" | "unknown"
