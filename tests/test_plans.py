"""Each stage is planned once per `sip` command: the corpus is listed and read for planning once."""

import polars as pl
from click.testing import CliRunner

import pipeline.corpus
import stages.shard
from pipeline.app.cli import main
from pipeline.plans import planned, planning_once
from tests.conftest import base_manifest, wiki_documents, write_jsonl, write_manifest


def _count_corpus_resolutions(monkeypatch) -> list[int]:
    """Every resolution of the corpus (globs, sizes, schema reads) goes through
    ``resolve_corpus``; count them, calling the real one."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return pipeline.corpus.resolve_corpus(*args, **kwargs)

    monkeypatch.setattr(stages.shard, "resolve_corpus", counted)
    return calls


def test_one_command_resolves_a_corpus_of_2000_files_once(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = wiki_documents(40, words=40)
    for i in range(2000):
        write_jsonl(corpus / f"part-{i:05d}.jsonl", [{**docs[i % 40], "id": f"d{i}"}])
    data = base_manifest(tmp_path / "out", [str(corpus / "*.jsonl")], shard={"pairs_per_document": 1},
                         rewriter={"model": "embedded"}, judge={"model": "embedded"})
    path = write_manifest(tmp_path / "m.yaml", data)
    calls = _count_corpus_resolutions(monkeypatch)

    # A dry run of every stage plans each one, and every later stage asks for the shard plan.
    result = CliRunner().invoke(main, ["run", "-m", str(path), "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0 and "prefs:" in result.output
    assert len(calls) == 1

    # A real run of the shard stage (its card included) resolves it once too.
    calls.clear()
    result = CliRunner().invoke(main, ["run", "--stages", "shard", "-m", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    assert pl.read_parquet(str(tmp_path / "out" / "shard" / "*.parquet"))["doc_id"].n_unique() > 1900


def test_plans_are_kept_only_inside_a_command_and_per_manifest(tmp_path):
    made = []

    def make():
        made.append(1)
        return len(made)

    class Manifest:  # what planned() reads of a manifest
        def __init__(self, value):
            self.source, self.value = tmp_path / "m.yaml", value

        def model_dump(self, mode):
            return {"value": self.value}

    assert planned("shard", Manifest(1), make) == 1 and planned("shard", Manifest(1), make) == 2  # no block: afresh
    with planning_once():
        assert planned("shard", Manifest(1), make) == 3
        assert planned("shard", Manifest(1), make) == 3  # an equal manifest: the same plan
        assert planned("shard", Manifest(2), make) == 4  # other settings: planned again
        assert planned("rewrite", Manifest(1), make) == 5
    with planning_once():
        assert planned("shard", Manifest(1), make) == 6  # a new command plans afresh
