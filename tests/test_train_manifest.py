"""The manifest's train section: defaults, and errors that name the key and what is allowed."""

from __future__ import annotations

import pytest

from pipeline.manifest import ManifestError, load_manifest, parse_manifest
from tests.conftest import REPO, base_manifest, write_manifest
from tests.test_train_data import train_manifest

PHASE = {"name": "a", "objective": "ntp", "steps": 3}


def _parse(tmp_path, train: dict):
    data = base_manifest(tmp_path, ["x.jsonl"])
    data["train"] = train
    return parse_manifest(data, "m.yaml")


@pytest.mark.parametrize("train, message", [
    ({"model": {"init": "scratch"}, "phases": [PHASE]},
     r"'train.model': .*config is required with init: scratch"),
    ({"model": {"init": "policy", "config": "pythia-14m"}, "phases": [PHASE]},
     r"config is only for init: scratch; the checkpoint of init: 'policy' carries its own model_config.yaml"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [{**PHASE, "stps": 3}]},
     r"unknown key 'train.phases.0.stps' \(did you mean 'steps'\?\); allowed here: batch_size, beta"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [{**PHASE, "epochs": 1}]},
     r"'train.phases.0': .*phase 'a': give exactly one of steps or epochs"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [{**PHASE, "objective": "ppo"}]},
     r"'train.phases.0.objective' is 'ppo'; allowed: 'ntp', 'rf_nll' or 'dpo'"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [PHASE, PHASE]},
     r"phase names must be unique; repeated: a"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": []}, r"train.phases: give at least one phase"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [PHASE], "devices": 0},
     r"'train.devices': .*must be 'auto' or at least 1, got 0"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [PHASE], "checkpoint": {"resume": "always"}},
     r"'train.checkpoint.resume' is 'always'; allowed: 'auto' or 'never'"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [PHASE], "precison": "bf16-mixed"},
     r"unknown key 'train.precison' \(did you mean 'precision'\?\)"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [{**PHASE, "source": "online"}]},
     r"phase 'a': an online phase trains on judged candidates: objective dpo or rf_nll"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [{**PHASE, "online": {"rollouts": 2}}]},
     r"phase 'a': 'online' settings need source: online"),
    ({"model": {"init": "scratch", "config": "x"},
      "phases": [{**PHASE, "objective": "dpo", "source": "online", "online": {"rolouts": 2}}]},
     r"unknown key 'train.phases.0.online.rolouts' \(did you mean 'rollouts'\?\)"),
    ({"model": {"init": "scratch", "config": "x"}, "phases": [{**PHASE, "source": "live"}]},
     r"'train.phases.0.source' is 'live'; allowed: 'table' or 'online'"),
])
def test_bad_train_sections_name_the_key(tmp_path, train, message):
    with pytest.raises(ManifestError, match=message):
        _parse(tmp_path, train)


def test_defaults_seed_tables_and_absolute_paths(tmp_path):
    from trainer.plan import table_path

    m = _parse(tmp_path, {"model": {"init": "ckpt"}, "phases": [
        {"name": "n", "objective": "ntp", "epochs": 1}, {"name": "s", "objective": "rf_nll", "steps": 2},
        {"name": "d", "objective": "dpo", "steps": 2, "table": "elsewhere/prefs"}]})
    assert m.train_seed == m.run.seed == 7 and m.train.checkpoint.resume == "auto"
    assert [table_path(m, p) for p in m.train.phases[:2]] == [m.stage_dir("shard"), m.stage_dir("prefs") / "sft"]
    m._source = tmp_path / "m.yaml"
    data = m.absolute_data()
    assert data["train"]["model"]["init"] == str(tmp_path / "ckpt")
    assert data["train"]["phases"][2]["table"] == str(tmp_path / "elsewhere" / "prefs")
    assert data["train"]["phases"][0]["table"] is None


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_shipped_manifests_have_a_train_section(name):
    m = load_manifest(REPO / "manifests" / name)
    assert [p.objective for p in m.train.phases][-1] == "dpo"


def test_model_config_and_vocabulary_errors(tmp_path):
    from pipeline.models import ModelNotFound
    from trainer.model import ModelError, check_vocab, model_config

    data = train_manifest(tmp_path, [PHASE])
    data["train"]["model"]["config"] = {**data["train"]["model"]["config"], "n_layers": 2}
    with pytest.raises(ModelError, match=r"train.model.config: unknown litgpt.Config field\(s\) \['n_layers'\]"):
        model_config(load_manifest(write_manifest(tmp_path / "m.yaml", data)))
    data["train"]["model"]["config"] = "no-such-model"
    with pytest.raises(ModelError, match=r"train.model.config: .*no-such-model"):
        model_config(load_manifest(write_manifest(tmp_path / "m.yaml", data)))
    data["train"]["model"]["config"] = "pythia-14m"  # vocabulary 50304: bigger than the test tokenizer's, fine
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", data))
    config = model_config(manifest)
    assert config.block_size >= 64
    check_vocab(config, tmp_path / "tok")
    config.padded_vocab_size = 50
    with pytest.raises(ModelError, match=r"policy tokenizer .* has 96 tokens but the model's vocabulary has 50"):
        check_vocab(config, tmp_path / "tok")
    data["train"]["model"] = {"init": str(tmp_path / "tok")}
    with pytest.raises(ModelNotFound, match=r"train.model.init: .* is not a LitGPT checkpoint directory \(no lit_model"):
        model_config(load_manifest(write_manifest(tmp_path / "m.yaml", data)))


def test_an_online_phase_gets_the_default_rollout_settings(tmp_path):
    m = _parse(tmp_path, {"model": {"init": "scratch", "config": "x"},
                          "phases": [{**PHASE, "objective": "dpo", "source": "online"}]})
    online = m.train.phases[0].online
    assert (online.rollouts, online.temperature, online.top_p, online.rewrite) == (4, 1.0, 1.0, True)
    assert m.train.phases[0].table_kind == "prefixes"


@pytest.mark.parametrize("mix, batch, message", [
    (0.5, 1, r"online.offline_mix 0.5 x batch_size 1 gives 0 offline rows per micro-batch"),
    (0.9, 4, r"online.offline_mix 0.9 x batch_size 4 gives 4 offline rows per micro-batch"),
])
def test_offline_mix_must_leave_offline_and_online_rows(tmp_path, mix, batch, message):
    with pytest.raises(ManifestError, match=message):
        _parse(tmp_path, {"model": {"init": "scratch", "config": "x"}, "phases": [
            {**PHASE, "objective": "dpo", "source": "online", "batch_size": batch, "online": {"offline_mix": mix}}]})
    m = _parse(tmp_path, {"model": {"init": "scratch", "config": "x"}, "phases": [
        {**PHASE, "objective": "dpo", "source": "online", "batch_size": 4, "online": {"offline_mix": 0.25}}]})
    assert m.train.phases[0].offline_rows_per_micro_batch == 1


@pytest.mark.parametrize("change, message", [
    ({"judge": None}, r"train.phases\[0\] \(a\) is online: the manifest has no 'judge' section"),
    ({"judge": {"model": "http://127.0.0.1:9/v1", "served_name": "j"}},
     r"judging.safety.mode: an endpoint judge supports 'verdict'"),
    ({"max_seq_len": 16}, r"train.max_seq_len \(16\) leaves no room for a prefix before the N = 16 suffix tokens"),
    ({"strategy": "fsdp"}, r"train.strategy: online phase 'a' samples its rollouts from the whole model"),
    ({"model": {"init": "scratch", "config": {"n_layer": 1, "n_head": 1, "n_embd": 8, "padded_vocab_size": 64,
                                              "mlp_class_name": "GptNeoxMLP"}}},
     r"train.phases\[0\].online.sampler: vllm needs a policy vLLM can be handed; .*mlp_class_name='GptNeoxMLP'.*"
     r"Set online.sampler: trainer"),
])
def test_an_online_phase_is_refused_before_any_phase_trains(tmp_path, change, message):
    from trainer.plan import check_online_phase

    data = base_manifest(tmp_path, ["x.jsonl"], shard={"suffix_tokens": 16})
    data["judge"] = change.pop("judge", {"model": "embedded"})
    if data["judge"] is None:
        del data["judge"]
    data["train"] = {"model": {"init": "scratch", "config": "x"}, "max_seq_len": 64,
                     "phases": [{**PHASE, "objective": "dpo", "source": "online"}], **change}
    m = parse_manifest(data, "m.yaml")
    with pytest.raises(Exception, match=message) as err:
        check_online_phase(m, m.train.phases[0], 0)
    from pipeline.errors import SipError

    assert isinstance(err.value, SipError)  # one line on the command line, no traceback


def test_push_every_must_divide_the_checkpoint_interval(tmp_path):
    """A resumed run pushes on the global-step grid from its checkpoint: the checkpoint must be on it."""
    from trainer.plan import check_online_phase

    data = base_manifest(tmp_path, ["x.jsonl"], shard={"suffix_tokens": 16})
    data["judge"] = {"model": "embedded"}
    data["train"] = {"model": {"init": "scratch", "config": "x"}, "max_seq_len": 64, "checkpoint": {"every": 10},
                     "phases": [{**PHASE, "objective": "dpo", "source": "online", "online": {"push_every": 3}}]}
    m = parse_manifest(data, "m.yaml")
    with pytest.raises(ManifestError, match=r"online.push_every \(3\) must divide train.checkpoint.every \(10\)"):
        check_online_phase(m, m.train.phases[0], 0)


def test_a_table_of_a_stage_that_did_not_finish_is_refused(tmp_path):
    """A shard whose checks refused its outputs (no card) leaves Parquet files: training must not read them."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.source import TableError, load_table

    shard = tmp_path / "out" / "shard"
    shard.mkdir(parents=True)
    (shard / "_stage.json").write_text(json.dumps({"stage": "shard"}))
    pq.write_table(pa.table({"prefix_ids": [[1, 2]], "suffix_ids": [[3]]}), shard / "00000.parquet")
    with pytest.raises(TableError, match=r"train.phases\[0\].table: the shard stage at .* did not finish \(no card"):
        load_table(shard, "pairs", "train.phases[0].table", tmp_path / "cache")
    (shard / "card.json").write_text("{}")
    assert load_table(shard, "pairs", "train.phases[0].table", tmp_path / "cache").num_rows == 1


@pytest.mark.parametrize("bad_id", [-5, 10_000_000])
def test_a_token_id_outside_the_vocabulary_is_refused_before_training(tmp_path, bad_id):
    import pyarrow.parquet as pq

    from pipeline.io import read_table
    from trainer.loop import run_train
    from trainer.model import ModelError

    data = train_manifest(tmp_path, [PHASE])
    shard = tmp_path / "out" / "shard"
    table = read_table(shard)
    rows = table.to_pylist()
    rows[1]["suffix_ids"] = rows[1]["suffix_ids"][:-1] + [bad_id]
    pq.write_table(table.from_pylist(rows, schema=pq.read_schema(shard / "00000.parquet")), shard / "00000.parquet")
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", data))
    # What an earlier run left: --force must not delete it for a run it then refuses.
    earlier = tmp_path / "out" / "train" / "checkpoints" / "step-00000001" / "lit_model.pth"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"weights")
    expected = rf"00000\.parquet: row group 0: token id {bad_id} is outside the model's vocabulary \(0\.\.\d+\)"
    for kwargs in ({"dry_run": True}, {}, {"force": True}):
        with pytest.raises(ModelError, match=expected):
            run_train(manifest, log=lambda _line: None, **kwargs)
        assert earlier.read_bytes() == b"weights", kwargs
    assert [p.name for p in earlier.parent.parent.iterdir()] == ["step-00000001"]


@pytest.mark.parametrize("damage, message", [
    ("null list", r"00000\.parquet: row group 0: 1 row\(s\) with a null suffix_ids \(first: row 2 of the group\)"),
    ("null id", r"00000\.parquet: row group 0: 2 row\(s\) with a null token id in prefix_ids \(first: row 2 of"),
    ("empty target", r"00000\.parquet: row group 0: 1 row\(s\) with an empty suffix_ids \(first: row 3 of"),
    ("damaged footer", r"00000\.parquet could not be read as Parquet"),
])
def test_token_id_lists_training_cannot_use_are_refused_naming_the_file_and_row(tmp_path, damage, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io import read_table
    from trainer.source import TableError, load_table

    train_manifest(tmp_path, [PHASE])
    shard = tmp_path / "out" / "shard"
    table = read_table(shard)
    name = "prefix_ids" if damage == "null id" else "suffix_ids"
    column = table.column(name).to_pylist()
    if damage == "null list":
        column[2] = None
    elif damage == "null id":
        column[2][1] = column[4][0] = None
    elif damage == "empty target":
        column[3] = []
    # A nullable field (the stage's schema says not null, and would store a null as empty).
    table = table.set_column(table.schema.get_field_index(name), name,
                             pa.array(column, table.schema.field(name).type))
    pq.write_table(table, shard / "00000.parquet")
    if damage == "damaged footer":
        data = bytearray((shard / "00000.parquet").read_bytes())
        data[-200:-8] = bytes(range(192))
        (shard / "00000.parquet").write_bytes(bytes(data))
    with pytest.raises(TableError, match=message):
        load_table(shard, "pairs", "train.phases[0].table", tmp_path / "cache")
