"""The held-out split (shard.eval_fraction): the rule by hand, then real shard runs (the real
tokenizer, real Parquet, datatrove's local executor) and the trainer's refusal."""

import hashlib
import shutil

import polars as pl
import pytest

from pipeline.io import UnitReader, read_table, table_provenance
from pipeline.manifest import parse_manifest
from pipeline.stage import StageConflict
from stages.heldout import heldout_document
from stages.shard import plan_shard, summary_line
from tests.conftest import base_manifest, wiki_documents, write_jsonl
from tests.test_shard_stage import quiet, run_shard

FRACTION = 0.2
PHASE = {"name": "ntp", "objective": "ntp", "steps": 1}


def test_the_rule_is_a_seeded_sha256_of_the_document_id():
    digest = hashlib.sha256("heldout\x1f7\x1fdoc-1".encode()).digest()
    h = int.from_bytes(digest[:8], "big")
    assert heldout_document("doc-1", seed=7, fraction=h / 2**64 + 1e-9)
    assert not heldout_document("doc-1", seed=7, fraction=h / 2**64 - 1e-9)
    ids = [f"doc-{i}" for i in range(20_000)]
    share = {f: sum(heldout_document(d, seed=7, fraction=f) for d in ids) / len(ids) for f in (0.0, 0.05, 0.2)}
    assert share[0.0] == 0 and abs(share[0.05] - 0.05) < 0.01 and abs(share[0.2] - 0.2) < 0.01
    small = {d for d in ids if heldout_document(d, seed=7, fraction=0.05)}
    large = {d for d in ids if heldout_document(d, seed=7, fraction=0.2)}
    other_seed = {d for d in ids if heldout_document(d, seed=8, fraction=0.2)}
    assert small < large  # a larger fraction holds out a superset
    assert len(large & other_seed) < 0.3 * len(large)  # another seed, another split (expected overlap 20%)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 real documents, each long enough for pairs, in 4 files."""
    root = tmp_path_factory.mktemp("corpus")
    docs = wiki_documents(300, words=60)
    for i in range(4):
        write_jsonl(root / f"c{i}.jsonl", docs[i::4])
    return [str(root / "c*.jsonl")], docs


def manifest(tmp_path, corpus_paths, out, fraction=FRACTION, tasks=3, **sections):
    shard = {"eval_fraction": fraction} if fraction is not None else {}
    return parse_manifest(base_manifest(tmp_path / out, corpus_paths, shard=shard,
                                        executor={"tasks": tasks, "workers": 1}, **sections))


def frame(path) -> pl.DataFrame:
    return pl.from_arrow(read_table(path)).sort("pair_id")


def test_held_out_documents_are_disjoint_from_the_pairs_and_the_same_for_any_task_count(tmp_path, corpus):
    paths, docs = corpus
    three = manifest(tmp_path, paths, "three", tasks=3)
    one = manifest(tmp_path, paths, "one", tasks=1)
    card = run_shard(three, log=quiet)
    run_shard(one, log=quiet)
    shard, heldout = plan_shard(three).stage.path, plan_shard(three).heldout_path
    pairs_ids, heldout_ids = set(frame(shard)["doc_id"]), set(frame(heldout)["doc_id"])
    assert not pairs_ids & heldout_ids
    assert pairs_ids | heldout_ids == {d["id"] for d in docs}
    assert heldout_ids == {d["id"] for d in docs if heldout_document(d["id"], seed=7, fraction=FRACTION)}
    assert abs(len(heldout_ids) / len(docs) - FRACTION) < 0.07
    # One file per task; the same rows with one task as with three.
    assert sorted(p.name for p in heldout.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert frame(heldout).equals(frame(plan_shard(one).heldout_path))
    assert frame(shard).equals(frame(plan_shard(one).stage.path))
    # Its own table, with provenance; counted in the card (the pairs table's rows exclude it).
    assert table_provenance(heldout)["table"] == "heldout" and table_provenance(shard)["table"] == "pairs"
    assert table_provenance(heldout)["settings"]["eval_fraction"] == FRACTION
    s = card["summary"]
    assert s["heldout_documents"] == len(heldout_ids) and s["heldout_pairs"] == len(frame(heldout))
    assert card["rows"] == s["pairs"] == len(frame(shard)) and s["documents_read"] == len(docs)
    assert summary_line(card).endswith(f"held out for evaluation: {s['heldout_pairs']} pairs from "
                                       f"{len(heldout_ids)} documents")


def test_held_out_pairs_are_cut_as_without_the_split_and_a_zero_fraction_changes_nothing(tmp_path, corpus):
    paths, _ = corpus
    split, whole = manifest(tmp_path, paths, "split"), manifest(tmp_path, paths, "whole", fraction=None)
    zero = manifest(tmp_path, paths, "zero", fraction=0.0)
    for m in (split, whole, zero):
        run_shard(m, log=quiet)
    # The same pairs, each in exactly one of the two tables.
    both = pl.concat([frame(plan_shard(split).stage.path), frame(plan_shard(split).heldout_path)]).sort("pair_id")
    assert both.equals(frame(plan_shard(whole).stage.path))
    # eval_fraction 0 (the default) writes no held-out table and keeps every fingerprint.
    assert not plan_shard(zero).heldout_path.exists()
    fingerprints = [plan_shard(m).stage.fingerprint for m in (zero, whole, split)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    # Holding documents out of an existing pairs table is refused, with the key named.
    with pytest.raises(StageConflict, match=r"shard.eval_fraction: 0.0 -> 0.2"):
        run_shard(manifest(tmp_path, paths, "whole"), log=quiet)


def test_no_held_out_document_reaches_a_training_table(tmp_path, corpus):
    from trainer.plan import plan_phases
    from trainer.source import TableError

    paths, _ = corpus
    train = {"model": {"init": "scratch", "config": "pythia-14m"}, "phases": [PHASE]}
    m = manifest(tmp_path, paths, "out", train=train)
    run_shard(m, log=quiet)
    plan = plan_shard(m)
    heldout_ids = set(frame(plan.heldout_path)["doc_id"])
    assert heldout_ids
    # The pairs table as the later stages read it (rewrite, rollout and judge deal its row groups
    # out with UnitReader; prefs joins their outputs to its pair ids) and as the trainer reads it.
    read = [row["doc_id"] for rank in range(2)
            for unit in UnitReader(str(plan.stage.path), columns=["doc_id"]).run(rank=rank, world_size=2)
            for row in unit.rows]
    assert len(read) == len(frame(plan.stage.path)) and not set(read) & heldout_ids
    (phase,) = plan_phases(m)
    assert phase.table == plan.stage.path and phase.rows == len(read)
    # A phase pointed at the held-out table, or at a copy of its files, is refused by name.
    copy = tmp_path / "copy"
    shutil.copytree(plan.heldout_path, copy)
    for table in (plan.heldout_path, copy):
        pointed = manifest(tmp_path, paths, "out", train={**train, "phases": [{**PHASE, "table": str(table)}]})
        with pytest.raises(TableError, match=r"train\.phases\[0\]\.table .*belongs to the held-out table "
                                             r"\(shard\.eval_fraction\).*no training phase may read"):
            plan_phases(pointed)
