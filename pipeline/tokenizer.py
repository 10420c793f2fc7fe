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


class TokenizerError(ValueError):
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
