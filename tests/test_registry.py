"""Stage chains: an upstream left out of `sip run --stages` must already be complete; what the
registry adds to a stage job (the judge self-check)."""

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


def test_the_judge_self_check_is_added_by_the_registry_and_reaches_the_card_job(tmp_path):
    """The judge stage knows nothing of judging.self_check: the registry wraps the stage's
    finalize with an importable function, which the Slurm card job unpickles (datatrove: dill)
    and runs as the local run does."""
    import dill

    from pipeline.app.judge_check.self_check import finalize_with_self_check
    from pipeline.app.registry import JOBS
    from pipeline.manifest import load_manifest
    from stages.judge import finalize_judge

    write_jsonl(tmp_path / "c.jsonl", wiki_documents(4, words=60))
    data = base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")])
    data.update(rewriter={"model": "embedded"}, judge={"model": "embedded"}, judging={"self_check": True})
    path = write_manifest(tmp_path / "m.yaml", data)
    finalize = dill.loads(dill.dumps(JOBS["judge"](load_manifest(path), True).finalize))
    assert finalize.func is finalize_with_self_check and finalize.args[0].func is finalize_judge
    assert finalize.args[1].stage == "judge"
    off = JOBS["judge"](load_manifest(path, ["judging.self_check=false"]), True)
    assert off.finalize.func is finalize_judge


def test_the_stage_graph_is_the_one_each_stage_plans_by(tmp_path):
    """Every upstream a stage's plan fingerprints is one its module states, and the registry's
    graph is those statements."""
    from pipeline.app.registry import JOBS, UPSTREAMS, upstream_closure
    from pipeline.manifest import parse_manifest
    from stages.judge import plan_judge
    from stages.prefs import plan_prefs
    from stages.rewrite import plan_rewrite
    from stages.rollout import plan_rollout
    from stages.shard import plan_shard

    write_jsonl(tmp_path / "c.jsonl", wiki_documents(2))
    data = base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")])
    data.update(rewriter={"model": "embedded"}, judge={"model": "embedded"}, rollouts={"count": 2})
    m = parse_manifest(data)
    plans = {"shard": plan_shard(m), "rewrite": plan_rewrite(m, True), "rollout": plan_rollout(m, True),
             "judge": plan_judge(m, True), "prefs": plan_prefs(m, True)}
    assert list(UPSTREAMS) == list(JOBS) == list(plans)
    for name, plan in plans.items():
        planned = {k.removeprefix("upstream.") for k in plan.stage.view if k.startswith("upstream.")}
        assert planned <= set(UPSTREAMS[name]), name
        assert all(list(JOBS).index(up) < list(JOBS).index(name) for up in UPSTREAMS[name])  # pipeline order
    assert upstream_closure("prefs") == ["shard", "rewrite", "rollout", "judge"]
