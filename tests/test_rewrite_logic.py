"""Pure logic of the rewrite stage: priming, statuses, refusal detection, prompt templates."""

import json
from pathlib import Path

import pytest

from pipeline.engines.base import Result
from pipeline.prompts import PromptError, PromptTemplate
from stages.refusals import is_refusal
from stages.rewrite import DEFAULT_PROMPT, primer_of, to_row

DATA = Path(__file__).parent / "data"


def test_primer_is_the_verbatim_tail_of_the_prefix():
    assert primer_of("It lies about  midway between the northern", 3) == "between the northern"
    assert primer_of("It lies about  midway between", 3) == "about  midway between"
    assert primer_of("one two\nthree ", 2) == "two\nthree "
    assert primer_of("short", 5) == "short"
    assert primer_of("anything", 0) == ""


PAIR = {"pair_id": "p", "prefix": "The cat sat", "suffix": " on the mat. It purred."}


def row_for(text, status="ok", suffix=PAIR["suffix"], primer=""):
    result = Result("p", status, texts=[text] if status == "ok" else [], finish_reasons=["stop"], prompt_tokens=10,
                    completion_tokens=5, error=None if status == "ok" else "why")
    return to_row(result, {**PAIR, "suffix": suffix}, primer, "m", "sha")


def test_statuses():
    assert row_for(" on the rug. It slept.")["status"] == "ok"
    copied = row_for("  on the   mat.\nIt purred. ")
    assert copied["status"] == "copied" and copied["rewrite"] == PAIR["suffix"]
    assert row_for("   ")["status"] == "empty"
    refused = row_for("I'm sorry, but I can't help with that.")
    assert refused["status"] == "refused" and refused["rewrite"] is None and "refusal" in refused["error"]
    assert row_for("", status="too_long")["status"] == "too_long"
    assert row_for("", status="error")["rewrite"] is None


def test_a_primer_the_model_repeats_is_not_kept_twice():
    row = row_for("cat sat on the rug.", primer="cat sat")
    assert row["rewrite"] == " on the rug."


@pytest.mark.parametrize("line", (DATA / "refusals.jsonl").read_text().splitlines())
def test_real_refusals_are_detected(line):
    assert is_refusal(json.loads(line)["text"])


@pytest.mark.parametrize("line", (DATA / "not_refusals.jsonl").read_text().splitlines())
def test_real_non_refusals_are_kept(line):
    row = json.loads(line)
    assert not is_refusal(row["text"], row["original"])


def test_prompt_template_renders_without_touching_braces_in_text(tmp_path):
    template = PromptTemplate.load(DEFAULT_PROMPT)
    messages = template.messages(prefix="a {b} {continuation}", continuation="x")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "a {b} {continuation}" in messages[1]["content"] and "x" in messages[1]["content"]
    assert len(template.sha) == 16
    bad = tmp_path / "bad.txt"
    bad.write_text("no sections here")
    with pytest.raises(PromptError, match="expected '### system'"):
        PromptTemplate.load(bad)


def test_a_prompt_template_saved_with_a_byte_order_mark_loads_as_without_one(tmp_path):
    plain = PromptTemplate.load(DEFAULT_PROMPT)
    marked = tmp_path / "rewrite.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + Path(DEFAULT_PROMPT).read_bytes())
    template = PromptTemplate.load(marked)
    assert template.sections() == plain.sections() and template.sha == plain.sha


def test_the_original_exempts_only_the_same_phrase():
    refusal = "I'm sorry, but I can't help with that."
    assert is_refusal(refusal, " platforms remove harmful content that users can't see.")
    assert not is_refusal(" \"I'm sorry, but I can't stay,\" she said.", " \"I'm sorry, but I can't stay.\"")


def test_a_primer_is_stripped_only_at_a_word_boundary():
    assert row_for(" theory, once more.", primer="the")["rewrite"] == " theory, once more."
