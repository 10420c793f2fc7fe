"""DPO reference log-probs: stored beside the preferences (never in them), keyed by everything
that changes them, joined by pair_id; on the tiny model of the trainer tests."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io import read_table, table_provenance, write_table_atomic
from pipeline.manifest import load_manifest
from pipeline.schema import PREFERENCES, REF_LOGPS, read_provenance, with_provenance
from tests.conftest import write_manifest
from tests.test_train_data import TINY_MODEL, logp_given, train_manifest, write_tables
from tests.test_train_loop import metrics_rows

DPO = {"name": "dpo", "objective": "dpo", "steps": 2, "batch_size": 8, "lr": 1e-3, "beta": 0.5}
QUIET = lambda _m: None  # noqa: E731


def _snapshot(directory) -> dict:
    """Every file under ``directory``: content hash and modification time (ns)."""
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _first_loss(train_dir) -> float:
    return float(metrics_rows(train_dir)[0]["loss"])


def _by_pair(directory) -> dict[str, tuple[float, float]]:
    table = read_table(directory)
    return {p: (c, r) for p, c, r in zip(*(table[k].to_pylist() for k in REF_LOGPS.names))}


def test_a_dpo_phase_stores_its_reference_beside_the_preferences_and_never_writes_them(tmp_path, one_thread):
    from trainer.data import TRUNCATION
    from trainer.loop import run_train
    from trainer.ref_logps import fingerprint_of, stored_sets

    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", train_manifest(tmp_path, [DPO])))
    prefs = manifest.stage_dir("prefs")
    before = _snapshot(prefs)
    lines: list[str] = []
    run_train(manifest, log=lines.append)
    assert _snapshot(prefs) == before  # same bytes, same mtimes: the prefs stage's files were not written

    train_dir = manifest.stage_dir("train")
    [ref] = stored_sets(train_dir / "ref_logps")
    sha = json.loads((train_dir / "final" / "train_state.json").read_text())["ref_sha"]
    assert ref.path.name == fingerprint_of(ref.keys) and ref.phase == "dpo"
    assert ref.keys == {"reference.model_sha": sha, "reference.model_config": ref.keys["reference.model_config"],
                        "train.max_seq_len": 64, "train.truncation": TRUNCATION, "train.precision": "32-true",
                        "logp": ref.keys["logp"], "preferences.stage_fingerprint": "test",
                        "preferences.content": ref.keys["preferences.content"]}
    file = ref.path / "00000.parquet"
    assert pq.read_schema(file).remove_metadata().equals(REF_LOGPS)
    prov = read_provenance(pq.read_schema(file))
    assert prov["table"] == "ref_logps" and prov["settings"] == ref.keys and prov["stage_fingerprint"] == ref.path.name
    assert prov["models"]["reference"] == {"checkpoint": "train.model.init: scratch", "model_sha": sha}
    assert pq.read_table(file).num_rows == 48
    assert any("computing reference log-probs of 48 pairs" in line and "no stored set found" in line for line in lines)
    assert _first_loss(train_dir) == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start

    # `--force` starts the run over but keeps the sets: they cannot be stale.
    again: list[str] = []
    run_train(manifest, force=True, log=again.append)
    assert not any("computing reference" in line for line in again) and stored_sets(train_dir / "ref_logps")
    assert _snapshot(prefs) == before


def test_the_command_stores_what_the_trainer_uses_joined_by_pair_id_and_a_missing_pair_is_refused(
        tmp_path, one_thread):
    from trainer.loop import run_train
    from trainer.ref_logps import ReferenceMismatch, run_ref_logps, stored_sets

    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", train_manifest(tmp_path, [DPO])))
    stored = run_ref_logps(manifest, log=QUIET)
    directory = manifest.stage_dir("train") / "ref_logps" / stored["fingerprint"]
    assert stored["ref_logps"] == str(directory) and stored["rows"] == 48
    file = directory / "00000.parquet"
    table = pq.read_table(file)

    # Rows stored in another order than the preferences: the trainer joins them by pair_id (a
    # join by row order would give a first DPO loss far from ln 2).
    pq.write_table(table.take(pa.array(range(47, -1, -1))), file)
    lines: list[str] = []
    run_train(manifest, log=lines.append)
    assert not any("computing reference" in line for line in lines)
    assert any(f"reference log-probs of phase 'dpo' from {directory}" in line for line in lines)
    assert _first_loss(manifest.stage_dir("train")) == pytest.approx(math.log(2), abs=1e-4)

    # A set that lacks a pair of the table is refused, naming both tables and the pair.
    pq.write_table(table.filter(pc.not_equal(table["pair_id"], "pair-0007")), file)
    with pytest.raises(ReferenceMismatch, match=rf"reference log-probs at {directory} lack 1 of the 48 pairs of the "
                                                rf"preferences table {manifest.stage_dir('prefs')} "
                                                r"\(e\.g\. pair_id pair-0007\).*sip ref-logps -m MANIFEST --clear"):
        run_train(manifest, force=True, log=QUIET)

    # --clear removes the phase's sets; the trainer then computes its own again.
    assert run_ref_logps(manifest, clear=True, log=QUIET)["removed"] == [str(directory)]
    assert stored_sets(directory.parent) == []


def test_a_changed_max_seq_len_recomputes_under_a_new_fingerprint_with_fresh_values(tmp_path, one_thread):
    from trainer.loop import run_train
    from trainer.ref_logps import run_ref_logps, stored_sets

    path = write_manifest(tmp_path / "m.yaml", train_manifest(tmp_path, [DPO]))
    old = run_ref_logps(load_manifest(path), log=QUIET)  # max_seq_len 64: the 24-token rows are whole
    manifest = load_manifest(path, ["train.max_seq_len=16"])  # now prefixes lose 8 tokens
    lines: list[str] = []
    run_train(manifest, log=lines.append)
    [line] = [line for line in lines if "computing reference" in line]
    assert f"{old['fingerprint']} differs in train.max_seq_len: 64 -> 16" in line  # the only differing key
    sets = {s.path.name: s for s in stored_sets(manifest.stage_dir("train") / "ref_logps")}
    assert len(sets) == 2 and old["fingerprint"] in sets
    [new] = [s for name, s in sets.items() if name != old["fingerprint"]]
    assert new.keys["train.max_seq_len"] == 16
    assert _first_loss(manifest.stage_dir("train")) == pytest.approx(math.log(2), abs=1e-4)

    # The values used are those a fresh computation under max_seq_len 16 gives, not the stored ones.
    fresh_data = train_manifest(tmp_path / "fresh", [DPO], max_seq_len=16)
    fresh = run_ref_logps(load_manifest(write_manifest(tmp_path / "fresh.yaml", fresh_data)), log=QUIET)
    assert fresh["fingerprint"] == new.path.name
    used, expected, stale = _by_pair(new.path), _by_pair(fresh["ref_logps"]), _by_pair(old["ref_logps"])
    assert used.keys() == expected.keys() == stale.keys()
    ids = sorted(used)
    np.testing.assert_allclose([used[p] for p in ids], [expected[p] for p in ids], rtol=0, atol=1e-9)
    assert np.abs(np.subtract([used[p] for p in ids], [stale[p] for p in ids])).max() > 0.1


def test_the_reference_scores_both_sides_of_a_pair_under_one_shared_prefix(tmp_path, one_thread):
    from trainer.model import build_model, model_config, state_sha
    from trainer.ref_logps import run_ref_logps

    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", train_manifest(tmp_path, [DPO], max_seq_len=16)))
    prefs = manifest.stage_dir("prefs")
    rows = read_table(prefs).to_pylist()
    for i, row in enumerate(rows):  # 12-token prefix, one side of 12 tokens and one of 8: 24 and 20 > 16
        side = ("rejected_ids", "chosen_ids")[i % 2]
        row[side] = row[side][:8]
    write_table_atomic(str(prefs / "00000.parquet"), rows, with_provenance(PREFERENCES, table_provenance(prefs)))
    stored = run_ref_logps(manifest, log=QUIET)

    # The reference (the scratch init) scores each side after the pair's last 16 - 12 = 4 prefix
    # tokens; the 8-token side alone would have had room for 8.
    model = build_model(model_config(manifest), manifest.train_seed, None).eval()
    assert state_sha(model.state_dict()) == stored["ref_model_sha"]
    used = _by_pair(stored["ref_logps"])
    for row in rows:
        shared = row["prefix_ids"][-4:]
        expected = (logp_given(model, shared, row["chosen_ids"]), logp_given(model, shared, row["rejected_ids"]))
        assert used[row["pair_id"]] == pytest.approx(expected, abs=1e-4), row["pair_id"]


def test_the_fingerprint_changes_with_what_changes_the_values_and_only_with_that(tmp_path):
    from litgpt import Config

    from trainer.ref_logps import fingerprint_of, reference_keys
    from trainer.source import load_table

    def mapped(path):
        return load_table(path, "preferences", "train.phases[0].table", tmp_path / "cache")

    write_tables(tmp_path, rows=12)
    prefs = tmp_path / "prefs"
    table = mapped(prefs)
    config = Config(**TINY_MODEL, block_size=64)
    base = reference_keys("abc", config, 64, "32-true", table, prefs)

    def fp(**kw):
        args = {"model_sha": "abc", "model_config": config, "max_seq_len": 64, "precision": "32-true",
                "table": table, "table_path": prefs, **kw}
        return fingerprint_of(reference_keys(**args))

    assert fp() == fingerprint_of(base)
    # Row and file order: no.
    shuffled = read_table(prefs).take(pa.array(np.random.default_rng(0).permutation(12))).to_pylist()
    (tmp_path / "shuffled").mkdir()
    for i, part in enumerate((shuffled[:5], shuffled[5:])):
        write_table_atomic(str(tmp_path / "shuffled" / f"0000{i}.parquet"), part,
                           with_provenance(PREFERENCES, table_provenance(prefs)))
    assert fp(table=mapped(tmp_path / "shuffled"), table_path=tmp_path / "shuffled") == fp()
    assert fp(model_config=Config(**TINY_MODEL, block_size=256)) == fp()  # block_size only sizes caches
    changed = {
        "model_sha": "abd",
        "model_config": Config(**{**TINY_MODEL, "n_head": 2}, block_size=64),
        "max_seq_len": 32,
        "precision": "bf16-true",
    }
    for key, value in changed.items():
        assert fp(**{key: value}) != fp(), key
    diff = reference_keys("abc", config, 64, "bf16-true", table, prefs)
    assert {k for k in base if base[k] != diff[k]} == {"train.precision"}

    # One chosen id changed in the table: another table, another fingerprint.
    rows = read_table(prefs).to_pylist()
    rows[3]["chosen_ids"] = rows[3]["chosen_ids"][:-1] + [(rows[3]["chosen_ids"][-1] + 1) % 96]
    other = tmp_path / "other"
    other.mkdir()
    write_table_atomic(str(other / "00000.parquet"), rows,
                       with_provenance(PREFERENCES, table_provenance(prefs)))
    assert fp(table=mapped(other), table_path=other) != fp()


def test_a_phase_resumed_mid_way_refuses_a_reference_it_cannot_recompute(tmp_path, one_thread):
    from trainer.loop import run_train
    from trainer.ref_logps import ReferenceMismatch, stored_sets

    data = train_manifest(tmp_path, [{**DPO, "steps": 4}], checkpoint={"every": 2, "keep_last": 5})
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", data))
    run_train(manifest, log=QUIET)
    train_dir = manifest.stage_dir("train")
    # Back to step 2 of the phase, as if the run had been killed there.
    shutil.rmtree(train_dir / "checkpoints" / "step-00000004")
    (train_dir / "train_summary.json").unlink()
    [ref] = stored_sets(train_dir / "ref_logps")

    # The phase's set is gone: its starting weights are too, so it is not recomputed.
    ref.path.rename(tmp_path / "aside")
    with pytest.raises(ReferenceMismatch, match=r"phase 'dpo' .* were removed after the phase started"):
        run_train(manifest, log=QUIET)
    (tmp_path / "aside").rename(ref.path)

    # The preferences were rebuilt with another pick since: refused, naming the key that differs.
    prefs = manifest.stage_dir("prefs")
    rows = read_table(prefs).to_pylist()
    rows[0]["chosen_ids"] = rows[0]["rejected_ids"]
    write_table_atomic(str(prefs / "00000.parquet"), rows, with_provenance(PREFERENCES, table_provenance(prefs)))
    with pytest.raises(ReferenceMismatch, match=r"phase 'dpo' started with reference log-probs made under other "
                                                r"settings than hold now:\n  preferences\.content: '[0-9a-f]+' -> "
                                                r"'[0-9a-f]+'\nThe reference"):
        run_train(manifest, log=QUIET)


def test_a_table_that_repeats_a_pair_id_cannot_be_keyed_and_is_refused(tmp_path):
    from trainer.ref_logps import ReferenceMismatch, check_unique_pairs
    from trainer.source import load_table

    write_tables(tmp_path, rows=6)
    prefs = tmp_path / "prefs"
    check_unique_pairs(load_table(prefs, "preferences", "t", tmp_path / "cache"), prefs)
    table = read_table(prefs)
    # The repeat sits in another file, as when two shard files hold one document.
    write_table_atomic(str(prefs / "00001.parquet"), table.slice(2, 1).to_pylist(),
                       with_provenance(PREFERENCES, table_provenance(prefs)))
    with pytest.raises(ReferenceMismatch, match=r"prefs: 1 pair_id\(s\) occur more than once \(e\.g\. pair-0002\)"):
        check_unique_pairs(load_table(prefs, "preferences", "t", tmp_path / "cache"), prefs)
