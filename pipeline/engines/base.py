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
    # Constrained decoding: each sample is exactly one of these strings (vLLM's structured
    # outputs, ``choice``; offline and in `vllm serve`). Empty: free text.
    choices: tuple[str, ...] = ()
    # Local engines only. Ids that end a sample (kept in its ids), beside the model's own eos.
    stop_token_ids: tuple[int, ...] = ()
    # Local engines only: return each sampled token's log-prob under the unmodified model
    # (before temperature and top_p) in ``Result.logprobs``.
    logprobs: bool = False
    # Local engines only: the seed of this call's draws, so a call's samples do not depend on
    # what the engine drew before (an online sampler's exact resume). Not a setting of the
    # texts' kind, so not in as_dict.
    seed: int | None = None

    def as_dict(self) -> dict:
        """What decides the texts (provenance); the optional keys only when set."""
        out = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
               "n": self.n, "stop": list(self.stop)}
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.choices:
            out["choices"] = list(self.choices)
        return out


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
    logprobs: list[list[float]] = field(default_factory=list)  # n samples' per-token log-probs (Sampling.logprobs)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


class Engine(abc.ABC):
    """Generation backend. Subclasses must be usable from a datatrove task.

    Only :meth:`generate` is required. The scoring methods (what the judge's ``choice_prob``
    and ``likelihood`` modes need) are declared here so callers never probe for them: a
    backend that cannot serve one raises ``NotImplementedError`` naming itself and the
    manifest setting that needs it.
    """

    #: model identity recorded in every output row and in provenance
    model_id: str
    #: max prompt + completion tokens the model accepts
    max_model_len: int
    #: seconds the engine took to start (loading the model); 0.0 for a remote server
    start_s: float = 0.0
    #: the model's Hugging Face tokenizer (chat template included); None when the backend has
    #: no local one (an endpoint), and then choice_prob and likelihood judging cannot run
    tokenizer = None
    #: what the message of an unsupported method tells the user to do (a backend may say more)
    unsupported_hint = "use a local judge (judge.model: embedded or a model directory)"

    @abc.abstractmethod
    def generate(self, requests: list[Request], sampling: Sampling) -> list[Result]:
        """One result per request, in order."""

    def _unsupported(self, what: str, needed_by: str) -> NotImplementedError:
        return NotImplementedError(f"the {type(self).__name__} backend ({self.model_id}) cannot give {what}, which "
                                   f"{needed_by} needs; {self.unsupported_hint}")

    def prompt_ids(self, request: Request) -> list[int]:
        """The token ids the model sees for ``request`` (chat template and prefill applied).

        Raises:
            NotImplementedError: the backend has no local tokenizer.
        """
        if self.tokenizer is None:
            raise self._unsupported("prompt token ids", "judging.<criterion>.mode: choice_prob")
        return chat_prompt_ids(self.tokenizer, request)

    def next_token_logprobs(self, sequences: list[list[int]], token_ids: list[int]) -> list[dict[int, float] | None]:
        """Log-probs (nats) of each of ``token_ids`` as the token after each sequence; None for
        a sequence that does not fit ``max_model_len``.

        Raises:
            NotImplementedError: the backend cannot read the next-token distribution.
        """
        raise self._unsupported("next-token log-probs", "judging.<criterion>.mode: choice_prob")

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float] | None]:
        """Per-token log-probs (nats) of ``sequence[start:]`` given what precedes it, per
        sequence (the model as a plain LM, no template); None for one that does not fit.

        Raises:
            NotImplementedError: the backend cannot score given tokens.
        """
        raise self._unsupported("the log-probs of given tokens", "judging.<criterion>.mode: likelihood")

    def push_weights(self, weights) -> float:
        """Replace the served model's weights in place with ``weights`` (an iterable of
        (Hugging Face name, tensor)); returns the seconds it took. What an online trainer calls
        so its sampler generates from the weights being trained.

        Raises:
            NotImplementedError: the backend's weights cannot be replaced from here.
        """
        raise self._unsupported("a weight push", "an online phase's vLLM sampler")

    def prefix_cache_stats(self) -> dict[str, int] | None:
        """Prefix-cache counters so far (``queried_tokens``, ``hit_tokens``), or None when the
        backend keeps none."""
        return None

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
