"""The policy tokenizer, loaded from a model directory's ``tokenizer.json``.

The fast ``tokenizers`` library is used directly (no transformers import in the hot path):
it batch-encodes in Rust and returns character offsets, which let the shard stage cut the
document's own text at token boundaries instead of decoding ids.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.errors import SipError


class TokenizerError(SipError, ValueError):
    pass


def tokenizer_file(directory: str | Path) -> Path:
    path = Path(directory)
    if path.is_file() and path.name.endswith(".json"):
        return path
    candidate = path / "tokenizer.json"
    if not candidate.is_file():
        raise TokenizerError(
            f"no tokenizer.json in {directory}: policy.tokenizer must be a directory holding a "
            "Hugging Face fast tokenizer (tokenizer.json)"
        )
    return candidate


@lru_cache(maxsize=4)
def load_tokenizer(directory: str) -> Tokenizer:
    tok = Tokenizer.from_file(str(tokenizer_file(directory)))
    tok.no_truncation()
    tok.no_padding()
    return tok


@lru_cache(maxsize=16)
def tokenizer_id(directory: str) -> str:
    """Content hash of the tokenizer: part of every pair id, so ids change if the tokenizer does."""
    return hashlib.sha256(tokenizer_file(directory).read_bytes()).hexdigest()[:16]


def char_boundaries(offsets: list[tuple[int, int]]) -> list[bool]:
    """``b[i]``: token i starts a new character (it does not continue the previous token's)."""
    return [i == 0 or offsets[i][0] >= offsets[i - 1][1] for i in range(len(offsets))] + [True]


def clip_to_tokens(text: str, tokenizer, n: int) -> str:
    """The longest prefix of ``text`` that is at most ``n`` policy tokens, cut where a token
    starts a new character (never inside one), so the judged text is what gets trained on."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    if len(enc.ids) <= n:
        return text
    bounds = char_boundaries(enc.offsets)
    k = n
    while k > 0 and not bounds[k]:
        k -= 1
    return text[: enc.offsets[k][0]] if k > 0 else ""


def end_of_text_ids(directory: str | Path) -> frozenset[int]:
    """The ids that end a continuation of the model in ``directory``, as vLLM decides them:
    ``eos_token_id`` of ``generation_config.json`` (an id or a list), else of ``config.json``,
    else the tokenizer's ``eos_token``. Empty when none is declared (samples run to N)."""
    import json

    directory = Path(directory)
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return frozenset(value if isinstance(value, list) else [value])
    config = directory / "tokenizer_config.json"
    if config.is_file():
        token = json.loads(config.read_text()).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and (found := load_tokenizer(str(directory)).token_to_id(token)) is not None:
            return frozenset([found])
    return frozenset()
