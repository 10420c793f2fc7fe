"""Detecting a rewriter that declined to rewrite.

Instruct models asked to rewrite unsafe text often answer with a refusal instead. A refusal
must never be kept as a rewrite: it would teach the policy to stop mid-document and apologise.
A refusal is recognised by its opening (the first sentence or so), unless the original
continuation opens the same way (a story where a character says "I'm sorry" is not a refusal).
"""

from __future__ import annotations

import re

# Openings of refusals as assistant models phrase them (ChatGPT, Llama-2-chat, Claude,
# Mistral, Gemma, SmolLM ...), matched case-insensitively at the start of the answer.
_OPENINGS = [
    r"i(?:'m| am) sorry,? (?:but )?(?:i|as an)",
    r"(?:sorry|i apologi[sz]e),? (?:but )?i (?:can(?:no|')t|am unable|won't|will not)",
    r"i (?:can(?:no|')t|am unable to|am not able to|won't|will not|must decline to|must respectfully decline)"
    r" (?:help|assist|fulfill|comply|provide|create|generate|write|rewrite|continue|complete|do that|engage|produce)",
    r"i(?:'m| am) (?:not able|unable) to (?:help|assist|fulfill|comply|provide|create|generate|write|rewrite|continue)",
    r"as an ai(?: language model| assistant)?,? i",
    r"i'?m just an ai",
    r"i do not feel comfortable",
    r"i don't feel comfortable",
    r"(?:unfortunately, )?i can(?:no|')t (?:and won't )?(?:help|assist) with",
    r"this (?:request|content) (?:is|goes) against",
    r"it(?:'s| is) not appropriate (?:for me )?to",
]
# Phrases that mark a refusal anywhere in a short answer.
_ANYWHERE = [
    r"against my (?:programming|guidelines|policies|ethical guidelines)",
    r"i (?:can(?:no|')t|won't) (?:create|generate|produce|write) (?:content|text) that",
    r"(?:harmful|offensive|inappropriate|explicit) content\b.{0,40}\b(?:can(?:no|')t|won't|not able)",
]
_OPENING = re.compile(r"^\W*(?:" + "|".join(_OPENINGS) + ")", re.IGNORECASE)
_ANY = re.compile("|".join(_ANYWHERE), re.IGNORECASE | re.DOTALL)


def refusal_phrase(text: str) -> str | None:
    """The refusal phrase found in ``text``, or None."""
    head = text.strip()[:300]
    if m := _OPENING.search(head):
        return m.group(0).strip()
    if len(text) < 600 and (m := _ANY.search(text)):
        return m.group(0).strip()
    return None


def is_refusal(text: str, original: str = "") -> bool:
    """True if ``text`` is a refusal and the original continuation was not already one."""
    return refusal_phrase(text) is not None and refusal_phrase(original) is None
