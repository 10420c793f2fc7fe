"""The shard stage end to end on real files, the real tokenizer and datatrove's local executor."""

import gzip
import json

import duckdb
import polars as pl
import pytest

from pipeline.io import read_table
from pipeline.manifest import parse_manifest
from pipeline.stage import StageConflict, StageFailed
from pipeline.app.registry import run_stages
from stages.shard import plan_shard, summary_line
from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest


@pytest.fixture()
def corpus(tmp_path):
    docs = wiki_documents(60, words=60)
    for i in range(3):
        write_jsonl(tmp_path / f"c{i}.jsonl", docs[i::3])
    return [str(tmp_path / "c*.jsonl")], docs


def manifest(tmp_path, corpus_paths, out="out", **sections):
    return parse_manifest(base_manifest(tmp_path / out, corpus_paths, **sections))


def quiet(_msg):
    pass


def run_shard(manifest, **kw):
    """The shard stage alone, as `sip shard` runs it; its card."""
    return run_stages(manifest, ["shard"], **kw)["shard"]


def test_shard_writes_pairs_card_and_is_idempotent(tmp_path, corpus):
    paths, docs = corpus
    m = manifest(tmp_path, paths)
    card = run_shard(m, log=quiet)
    stage_dir = m.stage_dir("shard")
    table = read_table(stage_dir)
    assert card["rows"] == table.num_rows == card["summary"]["pairs"] > len(docs)  # 2 pairs per document
    assert card["summary"]["documents_read"] == len(docs)
    assert card["provenance"]["table"] == "pairs"
    assert (stage_dir / "README.md").is_file() and (stage_dir / "_logs" / "completions" / "00001").exists()
    assert len(set(table.column("pair_id").to_pylist())) == table.num_rows
    mtimes = {p: p.stat().st_mtime_ns for p in stage_dir.glob("*.parquet")}
    messages = []
    run_shard(m, log=messages.append)
    assert "already complete" in messages[0]
    assert mtimes == {p: p.stat().st_mtime_ns for p in stage_dir.glob("*.parquet")}


def test_outputs_open_unchanged_in_polars_and_duckdb(tmp_path, corpus):
    m = manifest(tmp_path, corpus[0])
    run_shard(m, log=quiet)
    glob = str(m.stage_dir("shard") / "*.parquet")
    frame = pl.read_parquet(glob)
    assert frame.schema["prefix_ids"] == pl.List(pl.Int32)
    assert frame.select(pl.col("suffix_ids").list.len().unique()).to_series().to_list() == [16]
    rows, suffix_len = duckdb.sql(f"select count(*), max(len(suffix_ids)) from read_parquet('{glob}')").fetchall()[0]
    assert rows == len(frame) and suffix_len == 16
    meta = json.loads(frame["meta"][0])
    assert "kind" in meta and frame["source"][0].startswith("c")


def test_ids_and_splits_do_not_depend_on_task_count(tmp_path, corpus):
    one = manifest(tmp_path, corpus[0], out="one", executor={"tasks": 1})
    many = manifest(tmp_path, corpus[0], out="many", executor={"tasks": 5, "workers": 2})
    run_shard(one, log=quiet)
    run_shard(many, log=quiet)
    a = pl.read_parquet(str(one.stage_dir("shard") / "*.parquet")).sort("pair_id")
    b = pl.read_parquet(str(many.stage_dir("shard") / "*.parquet")).sort("pair_id")
    assert a.equals(b)


def test_changed_settings_are_refused_with_the_keys_named_and_force_starts_over(tmp_path, corpus):
    run_shard(manifest(tmp_path, corpus[0]), log=quiet)
    changed = manifest(tmp_path, corpus[0], shard={"suffix_tokens": 12}, executor={"tasks": 3})
    with pytest.raises(StageConflict) as err:
        run_shard(changed, log=quiet)
    assert "shard.suffix_tokens: 16 -> 12" in str(err.value) and "executor.tasks: 2 -> 3" in str(err.value)
    card = run_shard(changed, force=True, log=quiet)
    assert card["rows"] > 0
    lengths = pl.read_parquet(str(changed.stage_dir("shard") / "*.parquet"))["suffix_ids"].list.len().unique()
    assert lengths.to_list() == [12]


def test_cli_shard_inspect_and_errors(tmp_path, corpus):
    path = write_manifest(tmp_path / "m.yaml", base_manifest(tmp_path / "out", corpus[0]))
    proc = run_sip("shard", "-m", str(path))
    assert "pairs from 60 documents" in proc.stdout and "docs/s" in proc.stdout
    shown = run_sip("inspect", str(tmp_path / "out" / "shard"), "-n", "1").stdout
    assert "table: pairs" in shown and "manifest_fingerprint" in shown and "prefix_ids: list<element: int32>" in shown
    for not_a_table in (tmp_path / "out", path):  # a directory without Parquet files; a YAML file
        proc = run_sip("inspect", str(not_a_table), check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(f"Error: {not_a_table}: ") and "Traceback" not in proc.stderr
    bad = write_manifest(tmp_path / "bad.yaml", base_manifest(tmp_path / "o2", [str(tmp_path / "none*.jsonl")]))
    proc = run_sip("shard", "-m", str(bad), check=False)
    assert proc.returncode == 2 and "matched no files" in proc.stderr and "Traceback" not in proc.stderr
    hub = write_manifest(tmp_path / "hub.yaml", base_manifest(tmp_path / "o3", corpus[0], policy={"model": "meta-llama/Llama-2-7b"}))
    proc = run_sip("shard", "-m", str(hub), check=False)
    assert proc.returncode == 2 and "policy.model" in proc.stderr and "hub id" in proc.stderr


def test_bad_rows_in_the_corpus_are_counted_in_the_card(tmp_path):
    docs = wiki_documents(6, words=60)
    lines = [json.dumps(d) for d in docs[:3]] + ["{not json", json.dumps({"id": "e", "text": ""})] + [json.dumps(d) for d in docs[3:]]
    write_jsonl(tmp_path / "c.jsonl", lines)
    card = run_shard(manifest(tmp_path, [str(tmp_path / "c.jsonl")]), log=quiet)
    assert card["summary"]["documents_read"] == 6
    assert card["summary"]["skipped"] == {"empty": 1, "malformed_json": 1}
    assert card["summary"]["documents_with_pairs"] == 6


def test_marked_upper_case_gzipped_and_unrecognised_files_in_a_corpus_directory(tmp_path):
    """A byte order mark before the first line, a gzip file named PART.JSONL.GZ: every document
    is read; a file in no corpus format is counted and named in the card."""
    docs = wiki_documents(10, words=60)
    lines = [json.dumps(d).encode() + b"\n" for d in docs]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(lines[:5]))
    (tmp_path / "corpus" / "PART.JSONL.GZ").write_bytes(gzip.compress(b"".join(lines[5:])))
    (tmp_path / "corpus" / "extra.csv").write_text("id,text\nx,not read\n")
    card = run_shard(manifest(tmp_path, [str(tmp_path / "corpus")]), log=quiet)
    s = card["summary"]
    assert s["documents_read"] == s["documents_with_pairs"] == 10 and s["skipped"] == {}
    assert s["ignored_files"] == 1 and s["ignored_file_names"] == [str(tmp_path / "corpus" / "extra.csv")]
    assert summary_line(card).endswith("skipped: none; ignored files (not a corpus format): 1")


def test_a_document_id_in_files_of_different_tasks_is_refused_before_any_later_stage(tmp_path):
    from pipeline.doc_ids import DuplicateDocumentId

    docs = wiki_documents(8, words=60)
    clash = {**docs[5], "id": docs[1]["id"]}  # another text under the id of a document in c0
    write_jsonl(tmp_path / "c0.jsonl", docs[:4])
    write_jsonl(tmp_path / "c1.jsonl", [docs[4], clash, docs[6]])
    m = manifest(tmp_path, [str(tmp_path / "c*.jsonl")], executor={"tasks": 2})  # task 0 reads c0, task 1 c1
    with pytest.raises(DuplicateDocumentId) as err:
        run_shard(m, log=quiet)
    assert f"'{docs[1]['id']}' 2 times ({tmp_path / 'c0.jsonl'}:2, {tmp_path / 'c1.jsonl'}:2)" in str(err.value)
    stage = plan_shard(m).stage
    assert stage.is_complete() and not (stage.path / "card.json").exists()  # every task ran; the check stopped it
    with pytest.raises(StageFailed, match="the shard stage is not complete"):
        stage.check_upstream_of("rewrite")  # what rewrite and rollout check before their first call
    # Run again (the CLI, one line on stderr): refused again, with nothing re-read.
    path = write_manifest(tmp_path / "m.yaml", base_manifest(tmp_path / "out", [str(tmp_path / "c*.jsonl")]))
    proc = run_sip("shard", "-m", str(path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and docs[1]["id"] in error[0] and "c0.jsonl:2" in error[0] and "c1.jsonl:2" in error[0]
    assert "corpus.id_key: null" in error[0]


def test_slurm_dry_run_prints_the_array_script(tmp_path, corpus):
    path = write_manifest(
        tmp_path / "m.yaml",
        base_manifest(tmp_path / "out", corpus[0], executor={"type": "slurm", "tasks": 3, "workers": 2,
                      "slurm": {"partition": "gpu", "gpus_per_task": 1, "sbatch_args": {"account": "lab"}}}),
    )
    script = run_sip("shard", "-m", str(path), "--dry-run").stdout
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --account=lab", "launch_pickled_pipeline", "source "):
        assert line in script
    assert not (tmp_path / "out" / "shard").exists()  # a dry run leaves no trace
