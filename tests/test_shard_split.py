"""Properties of the splitter on the real embedded tokenizer (hypothesis)."""

from datatrove.data import Document
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.tokenizer import char_boundaries, decode_continuation
from stages.shard import PairSplitter, split_points

WORDS = st.sampled_from(
    "the of and a in to is was for on as with by he at from his an were are which this be or has "
    "café naïve 日本 🙂 -- , . ; 1987 Wikipedia encyclopedia\n".split(" ")
)
texts = st.lists(WORDS, min_size=1, max_size=400).map(" ".join)


def splitter(tok_dir, n, min_prefix, max_prefix, pairs, seed):
    return PairSplitter(str(tok_dir), "tok", suffix_tokens=n, min_prefix_tokens=min_prefix,
                        max_prefix_tokens=max_prefix, pairs_per_document=pairs, seed=seed)


@example(text="日本", seed=0, n=1, min_prefix=1, extra_prefix=0, pairs=1, doc_id="0")  # prefix cut inside 日
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=texts,
    seed=st.integers(0, 2**31),
    n=st.integers(1, 40),
    min_prefix=st.integers(1, 30),
    extra_prefix=st.integers(0, 60),
    pairs=st.integers(1, 4),
    doc_id=st.text(min_size=1, max_size=20),
)
def test_pairs_are_contiguous_windows_of_the_document(embedded_dir, tokenizer, text, seed, n, min_prefix, extra_prefix, pairs, doc_id):
    max_prefix = min_prefix + extra_prefix
    enc = tokenizer.encode(text, add_special_tokens=False)
    doc = Document(text=text, id=doc_id, metadata={"source": "f.jsonl"})
    step = splitter(embedded_dir, n, min_prefix, max_prefix, pairs, seed)
    rows = list(step.pairs_of(doc, enc.ids, enc.offsets))
    bounds = char_boundaries(enc.offsets)
    allowed = [s for s in range(min_prefix, len(enc.ids) - n + 1) if bounds[s] and bounds[s + n]]
    assert len(rows) == min(pairs, len(allowed))
    assert len({r["pair_id"] for r in rows}) == len(rows)
    for r in rows:
        s = r["split_offset"]
        assert s in allowed
        assert len(r["suffix_ids"]) == n
        # The prefix keeps the last max tokens, less any that would start it inside a character.
        p0 = max(0, s - max_prefix)
        while not bounds[p0]:
            p0 += 1
        assert len(r["prefix_ids"]) == s - p0
        assert r["prefix_ids"] + r["suffix_ids"] == enc.ids[s - len(r["prefix_ids"]) : s + n]
        # The text is exactly what the ids say: no characters cut in half at either end.
        assert tokenizer.decode(r["prefix_ids"], skip_special_tokens=False) == r["prefix"]
        assert decode_continuation(tokenizer, r["prefix_ids"], r["suffix_ids"]) == r["suffix"]
        assert (r["prefix"] + r["suffix"]) in text
        assert r["doc_tokens"] == len(enc.ids)
    # Same inputs, same pairs: ids and split points do not depend on anything else.
    again = list(splitter(embedded_dir, n, min_prefix, max_prefix, pairs, seed).pairs_of(doc, enc.ids, enc.offsets))
    assert again == rows


@given(doc_id=st.text(max_size=30), seed=st.integers(0, 2**40), length=st.integers(0, 500))
def test_split_points_are_a_pure_function_of_seed_and_doc(doc_id, seed, length):
    kw = dict(seed=seed, suffix_tokens=32, min_prefix=8, pairs=3)
    bounds = [True] * (length + 1)
    points = split_points(doc_id, bounds, **kw)
    assert points == split_points(doc_id, bounds, **kw)
    assert points == sorted(set(points))
    assert all(8 <= p <= length - 32 for p in points)


def test_different_seeds_or_documents_move_the_split():
    bounds = [True] * 1001
    a = [split_points(f"doc{i}", bounds, seed=1, suffix_tokens=16, min_prefix=8, pairs=1) for i in range(50)]
    b = [split_points(f"doc{i}", bounds, seed=2, suffix_tokens=16, min_prefix=8, pairs=1) for i in range(50)]
    assert a != b and len({p[0] for p in a}) > 40
