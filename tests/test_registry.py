"""Stage chains: an upstream left out of `sip run --stages` must already be complete."""

from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest


def test_a_chain_refuses_an_upstream_it_leaves_out_that_has_not_run(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", wiki_documents(4, words=60))
    data = base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")])
    data.update(rewriter={"model": "embedded"}, judge={"model": "embedded"}, rollouts={"count": 2})
    path = write_manifest(tmp_path / "m.yaml", data)
    # shard is in the chain, rewrite and rollout are not and never ran: refused before any work.
    proc = run_sip("run", "--stages", "shard,judge", "-m", str(path), check=False)
    assert proc.returncode != 0
    assert "judge: the rewrite stage is not complete" in proc.stderr
    assert not (tmp_path / "out" / "shard").exists() or not any((tmp_path / "out" / "shard").glob("*.parquet"))
