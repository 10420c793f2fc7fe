"""Does the longest pair fit each engine? Checked before any work.

For every engine a manifest starts (the rewriter; the judge, per criterion and scoring mode;
the policy that samples rollouts) the longest prompt a pair can give is summed from its parts,
in that model's tokens: the prompt template rendered with the model's chat template, the part
of the prefix it is shown (``shard.max_prefix_tokens``, bounded by the window
``rewrite.prefix_tokens`` / ``judging.prefix_tokens``), the texts beside it (the original
suffix, candidates of at most N policy tokens) and the output it may write. When that is more
than the engine's context (:mod:`pipeline.engines.context`), the report says how many pairs of
the pairs table (when it exists) will not fit and what to change.

Token counts in another tokenizer than the policy's are converted with the ratio of the two
tokenizers' counts on the pairs' prefixes (on a fixed English sample before the pairs table
exists): an estimate, said in the report, exact when the tokenizers are the same file.
``sip manifest check``, every ``--dry-run`` and the start of each LLM stage print it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from pipeline.engines.base import Request, chat_prompt_ids
from pipeline.engines.context import Context, model_context
from pipeline.engines.factory import counting_tokenizer, engine_context
from pipeline.errors import SipError
from pipeline.io import read_table, table_files
from pipeline.manifest import Manifest, ManifestError, ModelRef
from pipeline.models import policy_tokenizer_dir, resolve_model_dir
from pipeline.prompts import PromptTemplate
from pipeline.tokenizer import load_tokenizer, tokenizer_id
from stages.verdicts import CHOICES

PROMPTS = Path(__file__).parent / "prompts"
# A chat template's own tokens per message, where no local template renders it (an endpoint).
_CHAT_TOKENS_PER_MESSAGE = 8
# English sample for the tokenizer ratio before the pairs table exists.
_SAMPLE = ("The committee met on Tuesday to review the budget for the coming year. Its members agreed that "
           "the library, closed since the storm in 2019, should reopen in the spring, and asked the city to "
           "publish the costs of repairs, staffing and new equipment before the next meeting in March.")


@dataclass
class Fit:
    """The longest prompt + output of one engine against its context."""

    engine: str  # "rewriter", "judge quality (choice_prob)", "policy (rollouts)"
    context: Context
    parts: dict[str, int]  # tokens of the longest prompt's parts and the output, in the model's tokens
    prefix_key: str | None  # the manifest key that bounds the prefix part (a window), if any
    prefix_room: int | None = None  # prefix tokens that fit beside the other parts (None: context unknown)
    affected: int | None = None  # pairs of the pairs table that will not fit; None: no table yet
    pairs: int | None = None
    fixes: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def longest(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.context.tokens is None or self.longest <= self.context.tokens

    def line(self) -> str:
        parts = " + ".join(f"{v:,} {k}" for k, v in self.parts.items())
        context = ("unknown context" if self.context.tokens is None
                   else f"context {self.context.tokens:,} ({self.context.source})")
        head = f"{self.engine}: longest {self.longest:,} tokens ({parts}); {context}"
        if self.context.tokens is None:
            return f"{head}: not checked ({self.note or 'the server reports no context'})"
        if self.fits:
            return f"{head}: fits" + (f" ({self.note})" if self.note else "")
        if self.affected is not None:
            affected = f"{self.affected:,} of {self.pairs:,} pairs will be too_long"
        elif self.prefix_room is not None and self.prefix_room <= 0:
            affected = (f"no pair fits: the parts beside the prefix alone need {self.longest - self.parts.get('prefix', 0):,}"
                        " tokens")
        else:
            affected = (f"every pair whose prefix takes more than {self.prefix_room:,} of these tokens will be too_long "
                        "(counted once the pairs table exists)")
        return f"{head}: DOES NOT FIT: {affected}; " + "; or ".join(self.fixes) + (f" ({self.note})" if self.note else "")


class _Model:
    """One model's token counting: its prompts (chat template) and its tokens per policy token."""

    def __init__(self, manifest: Manifest, ref: ModelRef, key: str, sample: list[str]):
        self.manifest, self.ref, self.key = manifest, ref, key
        self.counter = counting_tokenizer(manifest, ref, key)
        self.chat = None
        self.note = ""
        if ref.kind != "endpoint":
            from transformers import AutoTokenizer

            self.chat = AutoTokenizer.from_pretrained(str(resolve_model_dir(manifest, ref.model, f"{key}.model")))
        policy_dir = policy_tokenizer_dir(manifest)
        if ref.kind == "endpoint" or tokenizer_id(str(resolve_model_dir(manifest, ref.model, f"{key}.model"))) \
                == tokenizer_id(str(policy_dir)):
            self.ratio = 1.0
            if ref.kind == "endpoint":
                self.note = "an endpoint's tokens counted with the policy tokenizer"
        else:
            policy = load_tokenizer(str(policy_dir))
            mine = sum(len(e.ids) for e in self.counter.encode_batch(sample, add_special_tokens=False))
            theirs = sum(len(e.ids) for e in policy.encode_batch(sample, add_special_tokens=False))
            self.ratio = mine / max(theirs, 1)
            self.note = f"{self.ratio:.2f} of its tokens per policy token, measured on {len(sample)} texts"

    def tokens(self, policy_tokens: int) -> int:
        return math.ceil(policy_tokens * self.ratio)

    def prompt(self, template: PromptTemplate, prefill: str = "", **values: str) -> int:
        """Tokens of the template with empty values (chat template and prefill included)."""
        messages = template.messages(**values)
        if self.chat is not None:
            return len(chat_prompt_ids(self.chat, Request("fit", messages, prefill=prefill)))
        text = "".join(m["content"] for m in messages) + prefill
        return len(self.counter.encode(text, add_special_tokens=False).ids) + _CHAT_TOKENS_PER_MESSAGE * len(messages)


def _pairs_dir(manifest: Manifest) -> Path | None:
    """The pairs table, when it is complete and made with this manifest's shard settings."""
    from stages.shard import plan_shard

    try:
        stage = plan_shard(manifest).stage
    except (SipError, OSError):
        return None
    if not (stage.path / "card.json").is_file() or stage.conflicts() or not table_files(stage.path):
        return None
    return stage.path


def _prefix_lengths(pairs: Path | None, bound: int) -> list[int] | None:
    """Policy tokens of every pair's prefix: the split point, at most ``shard.max_prefix_tokens``
    (the shard stage keeps ``ids[max(0, split - max_prefix) : split]``). One int column read,
    not the prefixes' ids."""
    if pairs is None:
        return None
    return pc.min_element_wise(read_table(pairs, columns=["split_offset"]).column("split_offset"), bound).to_pylist()


def _sample(pairs: Path | None) -> list[str]:
    """Prefixes to measure tokenizers' ratio on: the first 64 pairs (one batch of one file)."""
    if pairs is not None:
        import pyarrow.parquet as pq

        for path in table_files(pairs):
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=64, columns=["prefix"]), None)
            if batch is not None and batch.num_rows:
                return batch.column("prefix").to_pylist()
    return [_SAMPLE]


def _settle(fit: Fit, model: _Model | None, window: int | None, lengths: list[int] | None) -> Fit:
    """Fill in the room for the prefix, the pairs that will not fit and the fixes."""
    context = fit.context.tokens
    if context is None:
        return fit
    other = fit.longest - fit.parts.get("prefix", 0)
    fit.prefix_room = context - other
    if lengths is not None:
        shown = [min(model.tokens(n) if model else n, window or math.inf) for n in lengths]
        fit.pairs, fit.affected = len(lengths), sum(s > fit.prefix_room for s in shown)
    return fit


def _fixes_for_window(fit: Fit, key: str, ref_key: str, own: int | None) -> list[str]:
    fixes = []
    if fit.prefix_room is not None and fit.prefix_room > 0:
        fixes.append(f"set {key} to at most {fit.prefix_room} (the model then sees the prefix's last "
                     f"{fit.prefix_room} tokens)")
    if own is None or own >= fit.longest:
        fixes.append(f"set {ref_key} to at least {fit.longest}" + (f" (the model's own context is {own:,})" if own else ""))
    if fit.prefix_room is not None and fit.prefix_room <= 0:
        fixes.append("shorten what is shown beside the prefix (shard.suffix_tokens, the output length)")
    return fixes


def _own_context(manifest: Manifest, ref: ModelRef, key: str) -> int | None:
    return None if ref.kind == "endpoint" else model_context(resolve_model_dir(manifest, ref.model, f"{key}.model"))


def rewriter_fit(manifest: Manifest, lengths: list[int] | None = None, sample: list[str] | None = None) -> Fit:
    ref, cfg, n = manifest.rewriter, manifest.rewrite, manifest.shard.suffix_tokens
    model = _Model(manifest, ref, "rewriter", sample or [_SAMPLE])
    template = PromptTemplate.load(manifest.resolve_path(cfg.prompt) if cfg.prompt else PROMPTS / "rewrite.txt")
    prefix = model.tokens(manifest.shard.max_prefix_tokens)
    window = cfg.prefix_tokens
    # The primer (the prefix's last words) is shown in the continuation and primes the answer.
    primer = 2 * model.tokens(3 * cfg.prime_words)
    parts = {"prompt": model.prompt(template, prefix="", continuation=""), "primer": primer,
             "prefix": min(prefix, window) if window else prefix, "suffix": model.tokens(n),
             "output": cfg.max_new_tokens or -(-5 * n // 4)}
    fit = _settle(Fit("rewriter", engine_context(manifest, ref, "rewriter"), parts, "rewrite.prefix_tokens",
                      note=model.note), model, window, lengths)
    if not fit.fits:
        fit.fixes = _fixes_for_window(fit, "rewrite.prefix_tokens", "rewriter.max_model_len",
                                      _own_context(manifest, ref, "rewriter"))
    return fit


def judge_fits(manifest: Manifest, lengths: list[int] | None = None, sample: list[str] | None = None) -> list[Fit]:
    """One :class:`Fit` per criterion that calls the judge (a classifier calls none)."""
    from stages.criteria import VERDICT_TOKENS

    ref, cfg, n = manifest.judge, manifest.judging, manifest.shard.suffix_tokens
    model = _Model(manifest, ref, "judge", sample or [_SAMPLE])
    context = engine_context(manifest, ref, "judge")
    own = _own_context(manifest, ref, "judge")
    prefix = model.tokens(manifest.shard.max_prefix_tokens)
    window = cfg.prefix_tokens
    shown = min(prefix, window) if window else prefix
    candidate = model.tokens(n)  # every candidate is at most N policy tokens (a rewrite is clipped to N)
    fits = []
    for criterion in ("safety", "quality", "factuality"):
        crit = getattr(cfg, criterion)
        if crit is None or crit.mode == "classifier":
            continue
        lead = CHOICES[criterion][0]
        if crit.mode == "likelihood":  # the prefix and a candidate scored as plain text, no prompt
            parts = {"prefix": shown, "candidate": candidate}
        else:
            template = PromptTemplate.load(PROMPTS / f"judge_{criterion}.txt")
            values = {"safety": {"candidate": ""}, "quality": {"prefix": "", "option_1": "", "option_2": ""},
                      "factuality": {"prefix": "", "reference": "", "candidate": ""}}[criterion]
            parts = {"prompt": model.prompt(template, prefill=lead, **values)}
            if criterion != "safety":
                parts["prefix"] = shown
            parts["candidates"] = candidate * (1 if criterion == "safety" else 2)
            # verdict: its reasoning, then the verdict step; choice_prob reads one next token.
            parts["output"] = cfg.max_new_tokens + VERDICT_TOKENS if crit.mode == "verdict" else 1
        fit = Fit(f"judge {criterion} ({crit.mode})", context, parts,
                  "judging.prefix_tokens" if "prefix" in parts else None, note=model.note)
        fit = _settle(fit, model, window, lengths if "prefix" in parts else None)
        if not fit.fits:
            fit.fixes = (_fixes_for_window(fit, "judging.prefix_tokens", "judge.max_model_len", own) if "prefix" in parts
                         else [f"set judge.max_model_len to at least {fit.longest}"])
        fits.append(fit)
    return fits


def policy_fit(manifest: Manifest, lengths: list[int] | None = None) -> Fit:
    """The policy samples K rollouts of N tokens after the whole prefix (no window: it is the
    context the policy is trained with)."""
    from pipeline.policy import policy_source

    directory, _ = policy_source(manifest)
    own = model_context(directory)
    cfg, n, bound = manifest.rollouts, manifest.shard.suffix_tokens, manifest.shard.max_prefix_tokens
    context = Context(cfg.max_model_len, "manifest") if cfg.max_model_len else \
        Context(own, "model config" if own else "unknown")
    fit = _settle(Fit("policy (rollouts)", context, {"prefix": bound, "output": n}, None), None, None, lengths)
    if not fit.fits:
        if own is None or own >= fit.longest:
            fit.fixes.append(f"set rollouts.max_model_len to at least {fit.longest}")
        if context.tokens > n:
            fit.fixes.append(f"set shard.max_prefix_tokens to at most {context.tokens - n}")
    return fit


def fit_report(manifest: Manifest, engines: tuple[str, ...] = ("rewriter", "judge", "policy")) -> list[Fit | str]:
    """A :class:`Fit` per engine the manifest starts, or a line saying why one was not checked
    (its model is not there yet, say)."""
    pairs = _pairs_dir(manifest)
    lengths, sample = _prefix_lengths(pairs, manifest.shard.max_prefix_tokens), _sample(pairs)
    out: list[Fit | str] = []
    for engine in engines:
        try:
            if engine == "rewriter" and manifest.rewriter is not None:
                out.append(rewriter_fit(manifest, lengths, sample))
            elif engine == "judge" and manifest.judge is not None:
                out += judge_fits(manifest, lengths, sample)
            elif engine == "policy" and manifest.rollouts.count:
                from pipeline.policy import check_context

                check_context(manifest)
                out.append(policy_fit(manifest, lengths))
        except ManifestError as exc:
            out.append(f"{engine}: REFUSED: the stage will not start: {exc}")
        except (SipError, OSError) as exc:
            out.append(f"{engine}: fit not checked: {exc}")
    return out


def fit_lines(manifest: Manifest, engines: tuple[str, ...], only_problems: bool = False) -> list[str]:
    """:func:`fit_report` as lines (``only_problems``: the engines that do not fit)."""
    lines = []
    for fit in fit_report(manifest, engines):
        if isinstance(fit, str):
            lines.append(fit)
        elif not only_problems or not fit.fits:
            lines.append(fit.line())
    return lines
