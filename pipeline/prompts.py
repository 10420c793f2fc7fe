"""Prompt templates: plain text files with ``### system`` / ``### user`` sections and
``{name}`` placeholders, versioned by the sha256 of their content (recorded in every row)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SipError

_SECTION = re.compile(r"^### (system|user)\s*$", re.MULTILINE)


class PromptError(SipError, ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    path: str
    text: str

    @classmethod
    def load(cls, path: str | Path) -> "PromptTemplate":
        path = Path(path)
        if not path.is_file():
            raise PromptError(f"prompt template not found: {path}")
        # utf-8-sig: a byte order mark (Windows editors write one) would hide the first section.
        template = cls(str(path), path.read_text(encoding="utf-8-sig"))
        template.sections()  # validate now, not mid-run
        return template

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def sections(self) -> list[tuple[str, str]]:
        parts = _SECTION.split(self.text)
        if len(parts) < 3 or parts[0].strip():
            raise PromptError(f"{self.path}: expected '### system' and/or '### user' sections")
        return [(role, body.strip()) for role, body in zip(parts[1::2], parts[2::2])]

    def messages(self, **values: str) -> tuple[dict, ...]:
        """Chat messages with ``{name}`` replaced by ``values`` (and nothing else: text may hold braces)."""
        # One pass, so a value that itself contains "{name}" is never substituted again.
        pattern = re.compile("|".join(re.escape("{" + name + "}") for name in values))
        return tuple(
            {"role": role, "content": pattern.sub(lambda m: values[m.group(0)[1:-1]], body) if values else body}
            for role, body in self.sections()
        )
