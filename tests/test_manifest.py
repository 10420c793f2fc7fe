from pathlib import Path

import pytest
import yaml

from pipeline.manifest import ManifestError, fingerprint, fingerprinted_view, load_manifest, parse_manifest
from tests.conftest import REPO, base_manifest


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "experiment.yaml"])
def test_shipped_manifests_validate(name):
    m = load_manifest(REPO / "manifests" / name)
    assert len(fingerprint(m)) == 16


def test_paper_manifest_is_the_papers_setting():
    m = load_manifest(REPO / "manifests" / "paper.yaml")
    assert m.shard.suffix_tokens == 128 and m.shard.max_prefix_tokens == 1920
    assert m.rollouts.count == 16 and m.judge.kind == "endpoint"
    assert {m.judging.safety.mode, m.judging.quality.mode, m.judging.factuality.mode} == {"verdict"}
    assert m.judging.samples == 5 and m.judging.temperature == 1.0
    assert m.executor.type == "slurm" and m.executor.for_stage("rewrite").slurm.gpus_per_task >= 1
    assert m.executor.for_stage("shard").slurm.gpus_per_task == 0


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    data = base_manifest(tmp_path, ["x.jsonl"])
    data["shard"]["sufix_tokens"] = 3
    with pytest.raises(ManifestError) as err:
        parse_manifest(data, "m.yaml")
    msg = str(err.value)
    assert "shard.sufix_tokens" in msg and "did you mean 'suffix_tokens'" in msg and "m.yaml" in msg


def test_bad_values_name_the_key_and_what_is_allowed(tmp_path):
    data = base_manifest(tmp_path, ["x.jsonl"], executor={"type": "pbs"})
    with pytest.raises(ManifestError, match=r"'executor.type' is 'pbs'; allowed: 'local' or 'slurm'"):
        parse_manifest(data)
    data = base_manifest(tmp_path, ["x.jsonl"], shard={"suffix_tokens": 0})
    with pytest.raises(ManifestError, match=r"shard.suffix_tokens"):
        parse_manifest(data)
    data = base_manifest(tmp_path, ["x.jsonl"], shard={"min_prefix_tokens": 100, "max_prefix_tokens": 10})
    with pytest.raises(ManifestError, match=r"min_prefix_tokens \(100\) must be <= max_prefix_tokens \(10\)"):
        parse_manifest(data)
    data = base_manifest(tmp_path, ["x.jsonl"])
    del data["policy"]
    with pytest.raises(ManifestError, match=r"missing required key 'policy'"):
        parse_manifest(data)


@pytest.mark.parametrize("section, message", [
    ({"baseline": "nope"}, r"^<manifest>: 'eval': baseline: 'nope' is not one of checkpoints \(start, final\)$"),
    ({"checkpoints": {"a/b": "final"}, "baseline": "a/b"},
     r"'eval.checkpoints': checkpoint name 'a/b': use letters, digits, '.', '_' or '-' \(it names files\)$"),
    ({"heldout_prompts": 0}, r"heldout_prompts, unsafe_prompts and mc_questions are all 0: nothing to evaluate on$"),
    ({"baselin": "start"}, r"unknown key 'eval.baselin' \(did you mean 'baseline'\?\)"),
    ({"checkpoints": {}}, r"'eval.checkpoints': name at least one checkpoint to evaluate$"),
    ({"unsafe_prompts": 500}, r"'eval.unsafe_prompts': Input should be less than or equal to 112"),
    ({"mc_questions": 5000}, r"'eval.mc_questions': Input should be less than or equal to 1000"),
    ({"checkpoints": {"start": "start", "a": "final"}, "versus": {"a": ["b"]}},
     r"'eval': versus: 'b' is not one of checkpoints \(start, a\)$"),
    ({"checkpoints": {"start": "start", "a": "final"}, "versus": {"a": ["start"]}},
     r"versus.a: a checkpoint is not compared with itself, and every checkpoint is already compared with the "
     r"baseline 'start'$"),
])
def test_an_eval_section_that_cannot_be_evaluated_is_refused_naming_the_key(tmp_path, section, message):
    data = base_manifest(tmp_path, ["x.jsonl"], eval=section)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data)


def test_fingerprint_ignores_layout_but_not_content(tmp_path):
    a = parse_manifest(base_manifest(tmp_path, ["x.jsonl"]))
    b = parse_manifest(base_manifest(tmp_path / "elsewhere", ["x.jsonl"], executor={"tasks": 9, "type": "slurm"}))
    c = parse_manifest(base_manifest(tmp_path, ["x.jsonl"], shard={"suffix_tokens": 17}))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)


def test_eval_fraction_is_checked_and_left_out_of_fingerprints_at_its_default(tmp_path):
    # Runs made before the key existed held nothing out: at 0 their fingerprints must not change.
    plain = parse_manifest(base_manifest(tmp_path, ["x.jsonl"]))
    zero = parse_manifest(base_manifest(tmp_path, ["x.jsonl"], shard={"eval_fraction": 0}))
    some = parse_manifest(base_manifest(tmp_path, ["x.jsonl"], shard={"eval_fraction": 0.1}))
    assert plain.shard.eval_fraction == 0.0 and "shard.eval_fraction" not in fingerprinted_view(plain)
    assert fingerprint(plain) == fingerprint(zero) != fingerprint(some)
    assert fingerprinted_view(some, ("shard",))["shard.eval_fraction"] == 0.1
    for bad in (1, -0.1):
        with pytest.raises(ManifestError, match=r"'shard.eval_fraction': Input should be"):
            parse_manifest(base_manifest(tmp_path, ["x.jsonl"], shard={"eval_fraction": bad}))


def test_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "sub" / "m.yaml"
    path.parent.mkdir()
    data = base_manifest(Path("out"), ["corpus/*.jsonl"])
    path.write_text(yaml.safe_dump(data))
    m = load_manifest(path, ["executor.tasks=5", "shard.seed=3"])
    assert m.executor.tasks == 5 and m.shard_seed == 3
    assert m.output_root == (tmp_path / "sub" / "out").resolve()
    with pytest.raises(ManifestError, match="expected KEY=VALUE"):
        load_manifest(path, ["executor.tasks"])


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_per_stage_executor_overrides(tmp_path):
    data = base_manifest(tmp_path, ["x.jsonl"], executor={"tasks": 8, "stages": {"rewrite": {"tasks": 1, "gpus_per_task": 2}}})
    m = parse_manifest(data)
    assert m.executor.for_stage("rewrite").tasks == 1 and m.executor.for_stage("rewrite").slurm.gpus_per_task == 2
    assert m.executor.for_stage("shard").tasks == 8 and m.executor.for_stage("shard").slurm.gpus_per_task == 0
    data["executor"]["stages"] = {"rewrit": {"tasks": 1}}
    with pytest.raises(ManifestError, match=r"'executor.stages' has no key 'rewrit'; allowed: 'shard', 'rewrite'"):
        parse_manifest(data)
    data["executor"]["stages"] = {}
    data["executor"]["workers"] = 0
    with pytest.raises(ManifestError, match=r"executor.workers.*-1 \(no limit\) or at least 1"):
        parse_manifest(data)


@pytest.mark.parametrize("judging, message", [
    ({"quality": {"mode": "classifier"}}, r"quality.mode: the classifier scores offensive text \(safety\) only"),
    ({"factuality": {"mode": "classifier"}}, r"factuality.mode: the classifier scores offensive text"),
    ({"likelihood": "sum"}, r"'judging.likelihood' is 'sum'; allowed: 'mean_logprob' or 'pmi'"),
])
def test_judging_modes_a_criterion_cannot_take_are_refused(tmp_path, judging, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(base_manifest(tmp_path, ["x.jsonl"], judging=judging))


def test_new_judging_and_layout_keys_leave_earlier_fingerprints_alone(tmp_path):
    plain = parse_manifest(base_manifest(tmp_path, ["x.jsonl"]))
    assert "judging.likelihood" not in fingerprinted_view(plain) and "experiment" not in fingerprinted_view(plain)
    pmi = parse_manifest(base_manifest(tmp_path, ["x.jsonl"], judging={"likelihood": "pmi"}))
    assert fingerprint(pmi) != fingerprint(plain)


def test_a_changed_phase_is_named_by_its_leaf_key():
    from pipeline.manifest import diff_views

    old = {"train.phases": [{"name": "a", "lr": 1e-3, "online": {"rollouts": 2}}]}
    new = {"train.phases": [{"lr": 2e-3, "name": "a", "online": {"rollouts": 4}}]}  # key order does not matter
    assert diff_views(old, new) == ["train.phases[0].lr: 0.001 -> 0.002", "train.phases[0].online.rollouts: 2 -> 4"]
    assert diff_views(old, {"train.phases": [*new["train.phases"], {"name": "b"}]})[0].startswith("train.phases: [")


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("run: {name: x, output_dir: out}\ncorpus:\n  paths: [embedded]\npolicy: {model: embedded}\n"
                    "train:\n  max_seq_len: 64\n  max_seq_len: 128\n")
    with pytest.raises(ManifestError, match=r"(?s)m\.yaml: not valid YAML.*found the key 'max_seq_len' twice \(first on "
                                            r"line 6, column 3, again on line 7, column 3\)"):
        load_manifest(path)
    # A merge key's values may be overridden: not a repeat.
    path.write_text("run: {name: x, output_dir: out}\ncorpus:\n  paths: [embedded]\npolicy: {model: embedded}\n"
                    "train:\n  model: {init: scratch, config: pythia-14m}\n  phases:\n"
                    "    - &base {name: ntp, objective: ntp, steps: 1}\n"
                    "    - {<<: *base, name: ntp2, steps: 2}\n")
    phases = load_manifest(path).train.phases
    assert [(p.name, p.steps) for p in phases] == [("ntp", 1), ("ntp2", 2)]
