"""The policy tokenizer, loaded from a model directory's ``tokenizer.json``.

The fast ``tokenizers`` library is used directly (no transformers import in the hot path):
it batch-encodes in Rust and returns character offsets, which let the shard stage cut the
document's own text at token boundaries instead of decoding ids.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import NamedTuple

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


# Continuations. A tokenizer encodes the start of a text differently from the same characters
# after other text: a Metaspace (SentencePiece-style, Llama-2) tokenizer prepends its word
# marker to a text's start, and a WordPiece one spells a word's inner pieces with '##'. So a
# continuation is never encoded or decoded on its own: it is encoded as part of
# ``prefix + text`` and decoded as part of ``prefix_ids + ids``, and only its own part is kept.


class Joined(NamedTuple):
    """``prefix + text`` encoded as one string (see :func:`join_encoding`)."""

    ids: list[int]
    offsets: list[tuple[int, int]]  # character offsets into prefix + text
    prefix_tokens: int  # the length of the prefix's own encoding
    start: int  # the first id that is not the prefix's own encoding

    @property
    def fused(self) -> bool:
        """The join merged tokens across the boundary (the text continues a word the prefix
        ends inside, and the tokenizer spells the two halves together): no id sequence both
        follows the prefix's own ids and is the tokenizer's encoding of prefix + text."""
        return self.start < self.prefix_tokens


def join_encoding(tokenizer, prefix: str, text: str) -> Joined:
    """Encodes ``prefix + text`` (no special tokens) and finds where the text's ids start: after
    the prefix's own encoding when the join leaves it intact, else at the first id that differs
    from it (then ``fused``, and ``ids[start:]`` also spell the prefix's last characters).

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a Hugging Face fast tokenizer.
    """
    tok = _backend(tokenizer)
    own = tok.encode(prefix, add_special_tokens=False).ids
    joint = tok.encode(prefix + text, add_special_tokens=False)
    # Each read of an Encoding's ids builds a new list: read them once (a loop over reads is
    # quadratic in the prefix's length).
    ids = joint.ids
    start = 0
    while start < min(len(own), len(ids)) and own[start] == ids[start]:
        start += 1
    return Joined(ids, joint.offsets, len(own), start)


def encode_continuation(tokenizer, prefix: str, text: str) -> list[int] | None:
    """The ids of ``text`` as the tokenizer encodes it after ``prefix``: the ids a model that
    was fed the prefix's ids produces to write ``text``. None when the join fuses tokens across
    the boundary (:attr:`Joined.fused`): no such ids exist."""
    joined = join_encoding(tokenizer, prefix, text)
    return None if joined.fused else joined.ids[joined.start:]


def clip_continuation(tokenizer, prefix: str, text: str, n: int) -> tuple[str, list[int]] | None:
    """The longest start of ``text`` that is at most ``n`` tokens after ``prefix``, and its ids
    (:func:`encode_continuation` of the clipped text, so what is judged is what is trained on).

    The cut falls where a token starts a new character (never inside one). Returns None when
    ``text`` fuses with the prefix (:attr:`Joined.fused`); ``("", [])`` when not even its first
    character fits.
    """
    joined = join_encoding(tokenizer, prefix, text)
    if joined.fused:
        return None
    ids, offsets = joined.ids[joined.start:], joined.offsets[joined.start:]
    if len(ids) <= n:
        return text, ids
    bounds = char_boundaries(offsets)
    for k in range(n, 0, -1):
        if bounds[k]:
            clipped = text[: offsets[k - 1][1] - len(prefix)]
            # A word cut short may encode in other pieces than inside the whole text: recheck.
            again = encode_continuation(tokenizer, prefix, clipped)
            if again is not None and len(again) <= n:
                return clipped, again
    return "", []


def decode_continuation(tokenizer, prefix_ids: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after ``prefix_ids`` (special tokens not shown): the text a model
    wrote by sampling ``ids`` after the prefix. Decoded on their own, a Metaspace tokenizer's
    ids would lose their leading space, and a WordPiece tokenizer's the space before their
    first word (or keep the '##' of a word's inner piece). Where decoding the prefix does not
    give the start of the joint text (a decoder that rewrites across the boundary), the ids
    are decoded on their own."""
    return decode_continuations(tokenizer, prefix_ids, [ids])[0]


def decode_continuations(tokenizer, prefix_ids: list[int], samples: list[list[int]]) -> list[str]:
    """:func:`decode_continuation` of each of ``samples`` after one prefix (the prefix decoded once)."""
    tok = _backend(tokenizer)
    prefix_ids = list(prefix_ids)
    before = tok.decode(prefix_ids, skip_special_tokens=True)
    out = []
    for ids in samples:
        joint = tok.decode(prefix_ids + list(ids), skip_special_tokens=True)
        out.append(joint[len(before):] if joint.startswith(before) else tok.decode(list(ids), skip_special_tokens=True))
    return out


def _backend(tokenizer) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` itself, or the one behind a Hugging Face fast tokenizer."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


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


_WORD_START = re.compile(r"(?<=\s)\S")


class Window(NamedTuple):
    """The part of a prefix a model is shown (:func:`prefix_window`)."""

    text: str  # the prefix's last characters, from a word's start (the whole prefix when it fits)
    tokens: int | None  # its length in the tokenizer's tokens (None: no tokenizer counted it)
    cut: bool  # the start of the prefix was left out


def prefix_window(tokenizer, prefix: str, max_tokens: int | None) -> Window:
    """The prefix's end, at most ``max_tokens`` tokens of ``tokenizer``: what a rewriter or judge
    with a bounded context is shown of a long prefix (long-context pipelines' left truncation:
    the text nearest the continuation is what decides it).

    The window starts at a word (after whitespace), so no model sees half a word; where the
    last ``max_tokens`` tokens hold no word start (text without spaces), at the first token
    that starts a new character. ``max_tokens`` None or a prefix that fits: the whole prefix.
    ``tokenizer``: a ``tokenizers.Tokenizer`` or a Hugging Face fast tokenizer.
    """
    tok = _backend(tokenizer)
    encoding = tok.encode(prefix, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
    if max_tokens is None or len(ids) <= max_tokens:
        return Window(prefix, len(ids), False)

    def fits(start: int) -> Window | None:
        # Re-encoded on its own, the window's first word may take other pieces: recount.
        n = len(tok.encode(prefix[start:], add_special_tokens=False).ids)
        return Window(prefix[start:], n, True) if n <= max_tokens else None

    first = offsets[len(ids) - max_tokens][0]
    # A byte-level token that starts a word holds the space before it: the word starts after it.
    # A few words on at most: each try re-encodes the window.
    for match in islice(_WORD_START.finditer(prefix, first), 8):
        if window := fits(match.start()):
            return window
    # No word start fits (text without spaces, or one long last word): the first character
    # boundary that does.
    bounds = char_boundaries(offsets)
    for k in range(len(ids) - max_tokens, len(ids)):
        if bounds[k] and (window := fits(offsets[k][0])):
            return window
    # Not even the last character fits (one character, several byte tokens): that character.
    return Window(prefix[-1], len(tok.encode(prefix[-1], add_special_tokens=False).ids), True)
