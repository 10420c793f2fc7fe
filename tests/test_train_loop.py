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


@pytest.fixture
def one_thread():
    """The tiny model is fastest on one thread, and the suite shares the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

    # The reference log-probs went into the preferences table with the reference's hash.
    prefs = pq.read_table(manifest.stage_dir("prefs") / "00000.parquet")
    shas = set(prefs["ref_model_sha"].to_pylist())
    assert len(shas) == 1 and None not in shas and prefs["ref_chosen_logp"].null_count == 0
    assert json.loads(prefs.schema.metadata[b"sip"])["reference_logps"] == {"model_sha": shas.pop()}

    # A finished run is not trained again.
    again: list[str] = []
    assert run_train(manifest, log=again.append)["steps"] == summary["steps"] == 36
    assert any("already complete" in line for line in again)


def test_reference_logps_command_matches_the_trainer_and_a_foreign_sha_is_refused(tmp_path, one_thread):
    from trainer.loop import run_train
    from trainer.ref_logps import ReferenceMismatch, run_ref_logps, write_reference

    data = train_manifest(tmp_path, [{"name": "dpo", "objective": "dpo", "steps": 2, "batch_size": 8, "lr": 1e-3}])
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", data))
    stored = run_ref_logps(manifest, log=lambda _m: None)
    table = manifest.stage_dir("prefs")
    before = pq.read_table(table / "00000.parquet")
    assert stored["rows"] == before.num_rows == 48 and before["ref_rejected_logp"].null_count == 0
    # The trainer's reference (the scratch init) is the model the command scored: used as stored.
    lines: list[str] = []
    run_train(manifest, log=lines.append)
    assert not any("computing reference" in line for line in lines)
    assert pq.read_table(table / "00000.parquet")["ref_chosen_logp"].to_pylist() == before["ref_chosen_logp"].to_pylist()

    # Log-probs of another model are refused, naming both hashes and the way out.
    n = before.num_rows
    write_reference(table, before["ref_chosen_logp"].to_numpy(), before["ref_rejected_logp"].to_numpy(), "0123abcd")
    with pytest.raises(ReferenceMismatch, match=rf"ref_model_sha is 0123abcd, but phase 'dpo' starts from model "
                                                rf"{stored['ref_model_sha']}.*sip ref-logps"):
        run_train(manifest, force=True, log=lambda _m: None)
    run_ref_logps(manifest, clear=True, log=lambda _m: None)
    assert pq.read_table(table / "00000.parquet")["ref_model_sha"].null_count == n


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
