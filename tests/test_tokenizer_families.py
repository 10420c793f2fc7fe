"""Every id sequence that is judged or trained on is its text's encoding as a continuation of
the prefix, for each common tokenizer family, not only the demo's byte-level BPE.

Small real ``tokenizer.json`` files of each family are trained on a few sentences: byte-level
BPE (GPT-2, SmolLM), Metaspace/SentencePiece-style BPE and Unigram with the word marker
prepended always, to the first word only or never, the Llama-2 file's form (the marker
prepended by the normalizer, no pre-tokenizer) and WordPiece (BERT). On each, the shard, the
rollout texts, the judge's candidate clipping, the preferences and the trainer's batches are
checked against the definition: the ids of ``text`` after ``prefix`` are the ids of
``prefix + text`` past the ids of ``prefix``.
"""

from __future__ import annotations

import math

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pipeline.engines.base import Engine, Result
from pipeline.manifest import CriterionConfig, JudgingConfig
from pipeline.schema import REWRITES
from pipeline.tokenizer import decode_continuation, load_tokenizer
from stages.criteria import Judge
from stages.shard import PairSplitter
from stages.verdicts import CHOICES

N = 6  # suffix tokens
# Texts every family's decoder gives back unchanged (no case folding, no spaces a WordPiece
# decoder cannot restore), with accents and a dash for the byte-level tokenizer.
DOCUMENTS = [
    "Hello world, this is a small test of the training code. The training of models is fun.",
    "Hello there! Training tokenizers on bytes, pieces and words is a naïve café task — but fun.",
    "Some prefix. The original end of it, written here and there by the training code.",
]
VERDICTS = ["FINAL DECISION: YES", "FINAL DECISION: NO", "FINAL ANSWER: Option 1", "FINAL ANSWER: Option 2",
            "FINAL VERDICT: No", "FINAL VERDICT: Possible", "FINAL VERDICT: Definite"]
REWRITES_OF = [", and then the code is rewritten.", " and then it is rewritten there.", "rewritten here too."]
TRAINING_TEXTS = DOCUMENTS * 3 + REWRITES_OF + VERDICTS * 20  # verdicts often enough to be merged into words


def _metaspace(scheme: str, unigram: bool = False) -> Tokenizer:
    if unigram:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=100, unk_token="<unk>", special_tokens=["<unk>"])
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=110, special_tokens=["<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
    tok.train_from_iterator(TRAINING_TEXTS, trainer)
    return tok


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAINING_TEXTS, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _llama2() -> Tokenizer:
    """Llama-2's tokenizer.json form: the normalizer prepends the marker and replaces spaces;
    no pre-tokenizer (a SentencePiece vocabulary, whose pieces never span two words)."""
    tok = _metaspace("first")
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TRAINING_TEXTS, trainers.WordPieceTrainer(vocab_size=110, special_tokens=["[UNK]"]))
    return tok


FAMILIES = {
    "byte_level_bpe": _byte_level,
    "metaspace_always_bpe": lambda: _metaspace("always"),
    "metaspace_first_unigram": lambda: _metaspace("first", unigram=True),
    "metaspace_never_bpe": lambda: _metaspace("never"),
    "llama2_normalizer_prepend": _llama2,
    "wordpiece": _wordpiece,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(directory holding tokenizer.json, the tokenizer as the pipeline loads it)."""
    directory = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param]().save(str(directory / "tokenizer.json"))
    return directory, load_tokenizer(str(directory))


def continuation(tok, prefix: str, text: str) -> list[int] | None:
    """The definition: the ids of prefix + text past the prefix's own ids (None: no such ids)."""
    own = tok.encode(prefix, add_special_tokens=False).ids
    joint = tok.encode(prefix + text, add_special_tokens=False).ids
    return joint[len(own):] if joint[:len(own)] == own else None


def spells(tok, text: str) -> bool:
    """The tokenizer's ids of ``text`` decode back to it."""
    return tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def shard_pairs(directory, tok) -> list[dict]:
    splitter = PairSplitter(str(directory), "tok", suffix_tokens=N, min_prefix_tokens=3, max_prefix_tokens=12,
                            pairs_per_document=12, seed=0)
    pairs = []
    for i, text in enumerate(DOCUMENTS):
        enc = tok.encode(text, add_special_tokens=False)
        pairs += splitter.pairs_of(Document(text=text, id=f"d{i}", metadata={}), enc.ids, enc.offsets)
    assert len(pairs) >= 20
    return pairs


def test_shard_suffix_ids_are_the_encoding_of_the_suffix_after_the_prefix(family):
    directory, tok = family
    for pair in shard_pairs(directory, tok):
        assert pair["suffix_ids"] == continuation(tok, pair["prefix"], pair["suffix"]), pair
        # A continuation's text starts where the prefix's last token ends (spaces included).
        assert decode_continuation(tok, pair["prefix_ids"], pair["suffix_ids"]) == pair["suffix"], pair


def test_a_rollout_of_the_original_ids_has_the_original_text(family):
    """Rollout texts are the sampled ids decoded after the prefix's ids: a sample equal to the
    original is the original's text (judged once, shown with its leading space)."""
    from stages.rollout import rollout_rows

    directory, tok = family
    for pair in shard_pairs(directory, tok):
        result = Result(pair["pair_id"], texts=["x"], token_ids=[pair["suffix_ids"]], finish_reasons=["length"])
        [row] = rollout_rows(pair, result, 1, tok, "m")
        assert row["text"] == pair["suffix"], pair


def write_rewrites(directory, rewrites: dict[str, str]):
    directory.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"pair_id": p, "rewrite": r, "status": "ok", "error": None, "model": "m", "prompt_sha": "s",
         "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop"} for p, r in rewrites.items()],
        schema=REWRITES), directory / f"{UNIT}_00000.parquet")
    return directory


UNIT = "00000_00000"  # the pairs table's first row group: every pair of these tests


@pytest.mark.parametrize("n", [1, 3, N])
def test_judge_clips_a_rewrite_to_n_tokens_after_the_prefix(family, tmp_path, n):
    from stages.judge import UpstreamCandidates

    directory, tok = family
    pairs, checked = shard_pairs(directory, tok), 0
    for k, rewrite in enumerate(REWRITES_OF):
        rewrites = write_rewrites(tmp_path / f"rw{k}", {p["pair_id"]: rewrite for p in pairs})
        upstream = UpstreamCandidates(str(rewrites), str(directory), n)
        for pair in pairs:
            candidates = upstream.for_pair(pair, UNIT)
            whole = continuation(tok, pair["prefix"], rewrite)
            if whole is None:  # the rewrite fuses with the prefix
                assert candidates.fused == 1 and [c.source for c in candidates.candidates] == ["original"]
                continue
            [mine] = [c for c in candidates.candidates if c.source == "rewrite"] or [None]
            if mine is None:  # nothing fits, or the same text as the original
                assert candidates.empty + candidates.duplicates == 1
                continue
            assert rewrite.startswith(mine.text) and len(mine.token_ids) == min(n, len(whole))
            assert list(mine.token_ids) == continuation(tok, pair["prefix"], mine.text), (pair, mine)
            if spells(tok, pair["prefix"] + mine.text):  # WordPiece cannot spell '.rewritten' (no space)
                assert decode_continuation(tok, pair["prefix_ids"], mine.token_ids) == mine.text
            checked += 1
    assert checked >= len(pairs)


@pytest.mark.parametrize("rewrite", REWRITES_OF)
def test_preferences_and_training_batches_hold_the_continuation_ids(family, tmp_path, rewrite):
    """shard -> judge (candidates, judgments rows) -> prefs -> the trainer's preferences table and
    batches: each trained sequence is the prefix's ids followed by the continuation's ids. The
    rewrite gets the higher reward, so it is chosen and the original rejected."""
    from pipeline.io import write_table_atomic
    from pipeline.schema import PREFERENCES, provenance, with_provenance
    from stages.judge import UpstreamCandidates, judgment_rows
    from stages.prefs import build_preferences
    from stages.scoring import Judged
    from trainer.data import collate
    from trainer.source import TableSource, load_table

    directory, tok = family
    pairs = [p for p in shard_pairs(directory, tok) if continuation(tok, p["prefix"], rewrite) is not None]
    rewrites = write_rewrites(tmp_path / "rw", {p["pair_id"]: rewrite for p in pairs})
    sets = [UpstreamCandidates(str(rewrites), str(directory), N).for_pair(p, UNIT) for p in pairs]
    sets = [s for s in sets if [c.source for c in s.candidates] == ["original", "rewrite"]]
    pairs = [p for p in pairs if p["pair_id"] in {s.pair_id for s in sets}]
    assert len(pairs) >= 10
    rows = pl.DataFrame([r for s in sets for r in judgment_rows(
        [Judged(c, {"safety": float(c.source == "rewrite"), "quality": None, "factuality": None},
                float(c.source == "rewrite")) for c in s.candidates], 1)])
    prefs, _, counts = build_preferences(rows, pl.DataFrame(pairs), min_margin=0.0)
    assert counts["usable"] == len(pairs) and all(p["chosen_source"] == "rewrite" for p in prefs)
    prov = provenance(stage="prefs", table="preferences", manifest_fingerprint="t", stage_fingerprint="t")
    (tmp_path / "prefs").mkdir()
    write_table_atomic(str(tmp_path / "prefs" / "00000.parquet"), prefs, with_provenance(PREFERENCES, prov))
    table = load_table(tmp_path / "prefs", "preferences", "train.phases[0].table", tmp_path / "cache")
    examples = TableSource(table, "preferences", 0, 64).examples(list(range(table.num_rows)))
    by_id = {p["pair_id"]: p for p in pairs}
    chosen_text = {p["pair_id"]: p["chosen"] for p in prefs}
    for example, row in zip(examples, table.take(range(table.num_rows))):
        pair = by_id[row["pair_id"]]
        for ids, text in ((example["chosen"], chosen_text[row["pair_id"]]), (example["rejected"], pair["suffix"])):
            expected = continuation(tok, pair["prefix"], text)
            assert ids == expected, (pair, text)
            batch = collate([example["prefix"]], [ids], pad_id=0)
            [sequence], [mask] = batch["input_ids"].tolist(), batch["target_mask"].tolist()
            assert sequence == pair["prefix_ids"] + expected
            assert [t for t, m in zip(sequence, mask) if m] == expected


def hf_tokenizer(directory):
    """The family as a judge engine holds it: a Hugging Face fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(directory / "tokenizer.json")))


class RecordingScorer(Engine):
    """Records what the judge asks of the model: the sequences scored in likelihood mode (zero
    log-probs), the choice tokens read in choice_prob mode (even odds)."""

    model_id, max_model_len = "recorder", 4096

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.scored, self.choices = [], []

    def generate(self, requests, sampling):
        raise AssertionError("these modes must not generate")

    def prompt_ids(self, request):
        return [0]

    def score(self, sequences, starts):
        self.scored += list(zip(sequences, starts))
        return [[0.0] * (len(s) - k) for s, k in zip(sequences, starts)]

    def next_token_logprobs(self, sequences, token_ids):
        self.choices.append(list(token_ids))
        return [{t: math.log(0.5) for t in token_ids} for _ in sequences]


def test_likelihood_mode_scores_each_candidates_ids_after_the_prefix(family):
    """The scored tokens are the candidate's ids after the prefix's own; where a candidate fuses
    with the prefix's last token, the fused token is scored as the candidate's."""
    directory, tok = family
    engine = RecordingScorer(hf_tokenizer(directory))
    judge = Judge(engine, JudgingConfig(safety=None, factuality=None, quality=CriterionConfig(mode="likelihood")))
    pairs = shard_pairs(directory, tok)
    judge.quality_batch([(p["prefix"], [p["suffix"], *REWRITES_OF], p["pair_id"]) for p in pairs])
    expected = [(p["prefix"], text) for p in pairs for text in (p["suffix"], *REWRITES_OF)]
    assert len(engine.scored) == len(expected)
    for (sequence, start), (prefix, text) in zip(engine.scored, expected):
        own = tok.encode(prefix, add_special_tokens=False).ids
        ids = continuation(tok, prefix, text)
        if ids is None:
            assert sequence == tok.encode(prefix + text, add_special_tokens=False).ids
            assert sequence[:start] == own[:start] and sequence[start] != own[start]
        else:
            assert (sequence, start) == (own + ids, len(own))


def test_choice_prob_reads_each_choices_first_token_after_the_lead_in(family):
    """Where the choices' first tokens after the lead-in differ, those are read; where they share
    one (a space before digits), after the lead-in and their shared start; where neither tells
    them apart (the tiny Unigram vocabulary spells ' YES' and ' NO' from a bare marker), it is
    an error."""
    import os

    from pipeline.manifest import ManifestError

    directory, tok = family
    for criterion, (lead, choices) in CHOICES.items():
        first = [continuation(tok, lead, c)[0] for c in choices]
        if len(set(first)) < len(first):
            shared = os.path.commonprefix(list(choices))
            after = [continuation(tok, lead + shared, c[len(shared):]) for c in choices]
            if shared and all(after):
                first = [ids[0] for ids in after]
        engine = RecordingScorer(hf_tokenizer(directory))
        judge = Judge(engine, JudgingConfig(**{c: CriterionConfig(mode="choice_prob") if c == criterion else None
                                               for c in CHOICES}))
        ask = {"quality": lambda: judge.quality("a prefix", [" one", " two"], "p"),
               "safety": lambda: judge.safety([" text"]),
               "factuality": lambda: judge.factuality([("a prefix", " reference", " text")])}[criterion]
        if len(set(first)) < len(first):
            with pytest.raises(ManifestError, match="start with different tokens"):
                ask()
            continue
        ask()
        assert engine.choices and all(asked == first for asked in engine.choices), criterion


@pytest.mark.parametrize("bound", [1, 4, 9, 40])
def test_a_prefix_window_is_the_prefixs_end_from_a_word_within_the_bound(family, bound):
    from pipeline.tokenizer import prefix_window

    _, tok = family
    for prefix in DOCUMENTS + ["naïve—café" * 6]:
        window = prefix_window(tok, prefix, bound)
        total = len(tok.encode(prefix, add_special_tokens=False).ids)
        assert prefix.endswith(window.text)  # the prefix's own characters, never re-decoded
        assert window.cut == (window.text != prefix) == (total > bound)
        assert window.tokens == len(tok.encode(window.text, add_special_tokens=False).ids)
        assert window.tokens <= bound or not window.cut or len(window.text) == 1  # a character is not split
        assert window.text  # never nothing: at worst part of the last word
        start = len(prefix) - len(window.text)
        if window.cut and prefix in DOCUMENTS and bound >= 9:  # room for a whole word: the window starts at one
            assert prefix[start - 1].isspace() and not window.text[0].isspace()
        if not window.cut:
            assert window.text == prefix and window.tokens == total
