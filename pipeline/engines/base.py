"""The engine interface: a batch of requests in, one result per request out.

A request is chat messages (rendered with the model's own chat template) plus an optional
``prefill``: the start of the assistant's answer, which the output continues (the rewriter's
priming). Or it is raw ``prompt_ids`` (local engines only): token ids the model continues as a
plain LM, no template (a base policy continuing a prefix: rollouts). A bad request (too long
for the model, refused by the server) gives a result with ``status`` ``too_long`` or
``error``; it never fails the batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["ok", "too_long", "error"]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "n": self.n, "stop": list(self.stop)}


@dataclass(frozen=True)
class Request:
    id: str
    messages: tuple[dict, ...] = ()
    prefill: str = ""
    prompt_ids: tuple[int, ...] | None = None  # set: continue these ids as they are (messages unused)


@dataclass
class Result:
    id: str
    status: Status = "ok"
    texts: list[str] = field(default_factory=list)  # n samples, without the prefill
    token_ids: list[list[int]] = field(default_factory=list)  # n samples' generated ids (local engines)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


class Engine(abc.ABC):
    """Generation backend. Subclasses must be usable from a datatrove task."""

    #: model identity recorded in every output row and in provenance
    model_id: str
    #: max prompt + completion tokens the model accepts
    max_model_len: int

    @abc.abstractmethod
    def generate(self, requests: list[Request], sampling: Sampling) -> list[Result]:
        """One result per request, in order."""

    def describe(self) -> dict:
        """Provenance: what produced the outputs."""
        return {"engine": type(self).__name__, "model": self.model_id, "max_model_len": self.max_model_len}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model / connections."""


def chat_prompt_ids(tokenizer, request: Request) -> list[int]:
    """The token ids a local model sees for ``request``: its own ids, or its messages rendered
    with the model's chat template (HF tokenizer) followed by the prefill."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text + request.prefill, add_special_tokens=False)
