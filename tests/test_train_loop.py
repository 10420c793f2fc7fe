"""The training loop on a tiny model (2.4M parameters) over demo-shaped Parquet tables."""

from __future__ import annotations

import csv
import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.manifest import load_manifest
from tests.conftest import write_manifest
from tests.test_train_data import TINY_MODEL, train_manifest


def metrics_rows(train_dir) -> list[dict]:
    rows = []
    for path in sorted((train_dir / "metrics").glob("version_*/metrics.csv")):
        with open(path, newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def tensorboard_scalar_tags(directory) -> set[str]:
    """Scalar tags in the TensorBoard event files under ``directory`` (TFRecord framing:
    length u64, its crc u32, the Event proto, its crc u32)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in directory.rglob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            at += 12 + length + 4
    return tags


def test_warmup_cosine_schedule_by_hand():
    from trainer.schedule import warmup_cosine

    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(13) == pytest.approx(0.1)
    assert f(4 + 9 / 2) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert warmup_cosine(0, 1, 0.5)(0) == pytest.approx(1.0)


@pytest.mark.slow
def test_ntp_loss_falls_dpo_accuracy_rises_and_outputs_are_litgpt_checkpoints(tmp_path, one_thread):
    from litgpt import GPT, Config

    from trainer.loop import run_train

    data = train_manifest(tmp_path, [
        {"name": "ntp", "objective": "ntp", "steps": 24, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
        {"name": "dpo", "objective": "dpo", "steps": 12, "batch_size": 8, "lr": 1e-3, "beta": 0.5},
    ], checkpoint={"every": 10, "keep_last": 2}, export_hf=True)
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", data))
    lines: list[str] = []
    summary = run_train(manifest, log=lines.append)
    train_dir = manifest.stage_dir("train")

    rows = metrics_rows(train_dir)
    ntp = [float(r["loss"]) for r in rows if r["phase_index"] == "0"]
    dpo = [r for r in rows if r["phase_index"] == "1"]
    assert len(ntp) == 24 and len(dpo) == 12
    assert ntp[-1] < 0.25 * ntp[0], ntp  # starts near ln(96) = 4.56
    assert ntp[0] == pytest.approx(math.log(96), rel=0.1)
    assert float(dpo[0]["loss"]) == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    accuracy = [float(r["dpo_accuracy"]) for r in dpo]
    assert sum(accuracy[-4:]) / 4 > 0.5, accuracy
    assert float(dpo[-1]["dpo_margin"]) > 0
    assert {"chosen_rate_original", "chosen_rate_rewrite", "tokens_per_s", "peak_mem_gb", "lr"} <= set(dpo[-1])
    assert any("ETA" in line for line in lines)
    assert {"loss", "lr", "dpo_accuracy"} <= tensorboard_scalar_tags(train_dir / "tensorboard")

    # Checkpoints: every 10 steps and at each phase end (10, 20, 24, 30, 36), the last 2 kept.
    names = sorted(p.name for p in (train_dir / "checkpoints").iterdir())
    assert names == ["step-00000030", "step-00000036"]
    final = train_dir / "final"
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "train_state.pt", "train_state.json"} <= {
        p.name for p in final.iterdir()}
    model = GPT(Config.from_file(final / "model_config.yaml"))
    model.load_state_dict(torch.load(final / "lit_model.pth", weights_only=True))  # a plain LitGPT checkpoint
    assert model.config.n_embd == TINY_MODEL["n_embd"]
    hf_config = json.loads((train_dir / "hf" / "config.json").read_text())  # the final weights, exported for vLLM
    assert summary["hf"] == str(train_dir / "hf") and hf_config["num_hidden_layers"] == TINY_MODEL["n_layer"]
    state = json.loads((final / "train_state.json").read_text())
    assert state["phase"] == "dpo" and state["phase_step"] == 12 and state["global_step"] == 36

    # The reference log-probs are a table of their own under the train output, keyed by the
    # reference fingerprint; the preferences table has no column for them.
    from trainer.ref_logps import stored_sets

    [ref] = stored_sets(train_dir / "ref_logps")
    assert ref.phase == "dpo" and ref.keys["train.max_seq_len"] == 64
    assert pq.read_table(ref.path / "00000.parquet").num_rows == 48
    prefs_columns = pq.read_schema(manifest.stage_dir("prefs") / "00000.parquet").names
    assert not {"ref_chosen_logp", "ref_rejected_logp", "ref_model_sha"} & set(prefs_columns)

    # A finished run is not trained again.
    again: list[str] = []
    assert run_train(manifest, log=again.append)["steps"] == summary["steps"] == 36
    assert any("already complete" in line for line in again)


def test_only_renamed_checkpoints_count_and_leftovers_of_a_killed_save_are_removed(tmp_path):
    from pipeline.atomic import remove_leftovers
    from trainer.checkpoint import TRAIN_STATE_FILE, latest_checkpoint, list_checkpoints

    root = tmp_path / "checkpoints"
    for name, complete in (("step-00000004", True), ("step-00000008", True), (".step-00000012.77.tmp", True),
                           ("step-00000010", False)):
        (root / name).mkdir(parents=True)
        (root / name / "lit_model.pth").write_bytes(b"partial")
        if complete:
            (root / name / TRAIN_STATE_FILE).write_bytes(b"state")
    assert [p.name for p in list_checkpoints(root)] == ["step-00000004", "step-00000008"]
    assert latest_checkpoint(root).name == "step-00000008"
    assert [p.name for p in remove_leftovers(root / "step-*")] == [".step-00000012.77.tmp"]
    assert not (root / ".step-00000012.77.tmp").exists() and latest_checkpoint(tmp_path / "none") is None
