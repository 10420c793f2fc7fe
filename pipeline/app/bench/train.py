"""`sip bench train` (`make bench-train`): the trainer's steps against a bare LitGPT loop.

Same model, same batches, same optimizer settings, one objective at a time (ntp, dpo):

- **sip**: ``run_train`` on a one-phase manifest, timed by the trainer's own metrics (its
  ``tokens_per_s`` windows, ``log_every = warmup`` so the first window, with its one-time
  costs, is left out; reference log-probs and the final checkpoint fall outside the windows);
- **bare**: the same ``litgpt.model.GPT`` (the trainer's starting weights) + ``torch.optim.AdamW``
  in a plain loop: forward, the loss written out with torch, backward, gradient clipping, step,
  on batches built before timing.

Each side runs in a fresh process (:func:`pipeline.app.bench.fresh_process.run_side`), so peak
memory (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own. The tables are synthetic
fixed-length rows of random token ids (throughput does not depend on the text), written
with the stages' schemas; both sides read them in the trainer's seeded order.
"""

from __future__ import annotations

import csv
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline.app.bench.fresh_process import run_side
from pipeline.errors import SipError
from pipeline.io import write_table_atomic
from pipeline.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from pipeline.schema import PAIRS, PREFERENCES, provenance, with_provenance

OBJECTIVES = ("ntp", "dpo")


class BenchError(SipError, ValueError):
    """Benchmark options that cannot run, naming the option."""


BARE_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def _write_tables(out: Path, rows: int, seq_len: int, suffix_len: int, vocab: int, seed: int) -> None:
    """pairs (shard/) and preferences (prefs/) tables of fixed-length random rows."""
    rng = np.random.default_rng(seed)
    prefix_len = seq_len - suffix_len
    pairs, prefs = [], []
    for i in range(rows):
        prefix, chosen, rejected = (rng.integers(0, vocab, n).tolist() for n in (prefix_len, suffix_len, suffix_len))
        pid = f"bench-{i:06d}"
        pairs.append({"pair_id": pid, "doc_id": pid, "source": "bench", "prefix": "", "suffix": "",
                      "prefix_ids": prefix, "suffix_ids": chosen, "split_offset": prefix_len, "doc_tokens": seq_len,
                      "meta": "{}"})
        prefs.append({"pair_id": pid, "prefix_ids": prefix, "chosen_ids": chosen, "rejected_ids": rejected,
                      "chosen_source": "rewrite", "rejected_source": "original", "chosen_reward": 1.0,
                      "rejected_reward": 0.0, "prompt": "", "chosen": "", "rejected": ""})
    for sub, name, schema, data in (("shard", "pairs", PAIRS, pairs), ("prefs", "preferences", PREFERENCES, prefs)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        prov = provenance(stage=sub, table=name, manifest_fingerprint="bench", stage_fingerprint="bench")
        write_table_atomic(str(out / sub / "00000.parquet"), data, with_provenance(schema, prov))


def bench_manifest(manifest: Manifest, out: Path, objective: str, *, model: str | None, batch_size: int | None,
                   seq_len: int, steps: int, log_every: int) -> dict:
    """A one-phase manifest (as data): the given manifest's train model and settings (or the
    embedded policy, or ``model``: ``policy``, a LitGPT config name or mapping, or a checkpoint
    directory),
    one device, no mid-run saves. ``batch_size`` None: the manifest's phase of this objective's."""
    data = manifest.absolute_data()
    train = dict(data.get("train") or {"model": {"init": "policy"}})
    if model is not None:
        if model == "policy" or Path(model).expanduser().is_dir():
            train["model"] = {"init": model if model == "policy" else str(Path(model).expanduser().resolve())}
        else:
            # A config name, or a YAML/JSON mapping of litgpt.Config fields.
            train["model"] = {"init": "scratch", "config": yaml.safe_load(model) if model.lstrip().startswith("{")
                              else model}
    template = next((p for p in train.get("phases", []) if p["objective"] == objective), {})
    phase = {k: v for k, v in template.items() if k in ("lr", "betas", "weight_decay", "grad_clip", "beta")}
    train.update(
        devices=1, num_nodes=1, max_seq_len=seq_len, export_hf=False, log_every=log_every, seed=manifest.train_seed,
        phases=[{**phase, "name": f"bench-{objective}", "objective": objective, "steps": steps,
                 "batch_size": batch_size or template.get("batch_size", 8), "grad_accum": 1, "warmup_steps": 0,
                 "min_lr_ratio": 1.0}],
        checkpoint={"every": 10**9, "keep_last": 1, "resume": "never"},
    )
    data["train"], data["run"]["output_dir"] = train, str(out)
    data["executor"] = {"type": "local"}
    return data


def _peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sip_side(spec: dict) -> dict:
    """run_train on ``spec["manifest"]``; tokens/s from its metrics windows after the first
    (``log_every = warmup``)."""
    import torch

    from trainer.loop import run_train

    manifest, warmup = load_manifest(spec["manifest"]), spec["warmup"]

    started = time.perf_counter()
    run_train(manifest, log=lambda _m: None)
    wall = time.perf_counter() - started
    [metrics] = (manifest.stage_dir("train") / "metrics").glob("version_*/metrics.csv")
    windows = [r for r in csv.DictReader(metrics.open()) if r.get("tokens_per_s") and int(r["phase_step"]) > warmup]
    seconds = sum(float(r["step_s"]) * warmup for r in windows)
    tokens = sum(float(r["tokens_per_s"]) * float(r["step_s"]) * warmup for r in windows)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"timed_steps": len(windows) * warmup, "seconds": seconds, "tokens": tokens, "wall_s": wall,
            "peak_mem_gb": _peak_memory_gb(device)}


def bare_side(spec: dict) -> dict:
    """A plain LitGPT + AdamW loop over the same rows (the trainer's seeded order), on
    ``spec["manifest"]`` with ``spec["warmup"]`` untimed steps."""
    import torch
    import torch.nn.functional as F

    from pipeline.io import read_table
    from pipeline.checkpoints import initial_model_dir
    from trainer.model import build_model, model_config
    from trainer.plan import table_path
    from trainer.source import SampleOrder

    manifest, warmup = load_manifest(spec["manifest"]), spec["warmup"]

    t, phase = manifest.train, manifest.train.phases[0]
    if t.precision not in BARE_PRECISIONS:
        raise ManifestError(f"train.precision {t.precision!r}: the bare loop supports {', '.join(BARE_PRECISIONS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The trainer's starting weights (a litgpt.model.GPT): the same numbers flow through both
    # loops; a different init can change CPU speed (denormals), not only the loss.
    model = build_model(model_config(manifest), manifest.train_seed, initial_model_dir(manifest))
    model = model.to(device, dtype=torch.bfloat16 if t.precision == "bf16-true" else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=phase.betas, weight_decay=phase.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16-mixed")

    table = read_table(table_path(manifest, phase))
    source = SampleOrder(table.num_rows, manifest.train_seed)  # phase 0: seed + 0
    batches = []
    for step in range(phase.steps):
        rows = source.row_indices(step * phase.batch_size, phase.batch_size)
        picked = table.take(rows)
        prefix = torch.tensor(picked["prefix_ids"].to_pylist())
        if phase.objective == "ntp":
            batches.append((torch.cat([prefix, torch.tensor(picked["suffix_ids"].to_pylist())], 1), None))
        else:
            # Both sides of a pair have suffix_len tokens after a prefix of seq_len - suffix_len
            # (_write_tables): nothing is trimmed, here or in the trainer (trainer.steps.pair_prefix).
            suffixes = torch.tensor(picked["chosen_ids"].to_pylist() + picked["rejected_ids"].to_pylist())
            # Reference log-probs are stored beside the table; their values do not change the time.
            ref = [torch.zeros(len(rows)), torch.zeros(len(rows))]
            batches.append((torch.cat([prefix.repeat(2, 1), suffixes], 1), (prefix.shape[1], *ref)))

    def step(ids: torch.Tensor, dpo) -> None:
        ids = ids.to(device)
        with autocast:
            logits = model(ids)[:, :-1].float()
        if dpo is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        else:
            start, ref_chosen, ref_rejected = dpo
            logp = torch.log_softmax(logits[:, start - 1:], -1).gather(-1, ids[:, start:, None]).squeeze(-1).sum(-1)
            chosen, rejected = logp.chunk(2)
            margin = (chosen - ref_chosen.to(device)) - (rejected - ref_rejected.to(device))
            loss = -F.logsigmoid(phase.beta * margin).mean()
        loss.backward()
        if phase.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), phase.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for ids, dpo in batches[:warmup]:
        step(ids, dpo)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for ids, dpo in batches[warmup:]:
        step(ids, dpo)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(ids.numel() for ids, _ in batches[warmup:])
    return {"timed_steps": len(batches) - warmup, "seconds": seconds, "tokens": tokens,
            "peak_mem_gb": _peak_memory_gb(device)}


def _run_side(side: str, manifest_path: Path, warmup: int) -> dict:
    runner = sip_side if side == "sip" else bare_side
    out = run_side(runner, {"manifest": str(manifest_path), "warmup": warmup}, manifest_path.parent, f"train-{side}")
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def bench_train(manifest: Manifest, *, objectives: tuple[str, ...] = OBJECTIVES, model: str | None = None,
                batch_size: int | None = None, seq_len: int | None = None, suffix_len: int | None = None,
                warmup: int = 2, steps: int = 10, repeats: int = 1) -> dict:
    """tokens/s of the trainer vs the bare loop per objective, their ratio and peak memory.

    ``steps`` timed steps follow ``warmup`` untimed ones (rounded up to whole windows of
    ``warmup`` steps, the trainer's logging interval here). Defaults come from the manifest:
    ``seq_len`` = ``train.max_seq_len`` (256 without a train section), ``suffix_len`` =
    ``shard.suffix_tokens``, ``batch_size`` = the phase's of the same objective. With
    ``repeats`` > 1 the sides alternate (sip first, then bare first, ...) and each keeps its
    best run: on a shared machine the slowest runs measure the neighbours, not the code.
    """
    seq_len = seq_len or (manifest.train.max_seq_len if manifest.train else 256)
    suffix_len = suffix_len or min(manifest.shard.suffix_tokens, seq_len // 2)
    if warmup < 1 or steps < 1 or repeats < 1 or not 0 < suffix_len < seq_len:
        raise BenchError("bench train: --warmup, --steps and --repeats must be >= 1 and 0 < suffix_len < --seq-len")
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown:
        raise BenchError(f"bench train: unknown --objectives {sorted(unknown)}; allowed: {', '.join(OBJECTIVES)}")
    from trainer.model import model_config

    total = warmup + -(-steps // warmup) * warmup
    report = {"seq_len": seq_len, "suffix_len": suffix_len, "warmup_steps": warmup, "timed_steps": total - warmup,
              "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="sip-bench-train-") as tmp:
        for objective in objectives:
            out = Path(tmp) / objective
            data = bench_manifest(manifest, out / "out", objective, model=model, batch_size=batch_size,
                                  seq_len=seq_len, steps=total, log_every=warmup)
            m = parse_manifest(data, "bench manifest")
            config = model_config(m)
            batch = m.train.phases[0].batch_size
            _write_tables(out / "out", rows=min(batch * total, 4096), seq_len=seq_len, suffix_len=suffix_len,
                          vocab=min(config.vocab_size, config.padded_vocab_size), seed=m.train_seed)
            path = out / "manifest.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            best: dict[str, dict] = {}
            for repeat in range(repeats):
                # sip first: a DPO run stores the reference log-probs the bare side reads.
                for side in ("sip", "bare") if repeat % 2 == 0 else ("bare", "sip"):
                    shutil.rmtree(out / "out" / "train", ignore_errors=True)  # else the run is "already complete"
                    result = _run_side(side, path, warmup)
                    if side not in best or result["tokens_per_s"] > best[side]["tokens_per_s"]:
                        best[side] = result
            sip, bare = best["sip"], best["bare"]
            ratio = round(sip["tokens_per_s"] / bare["tokens_per_s"], 3)
            report[objective] = {"model": data["train"]["model"], "precision": m.train.precision, "batch_size": batch,
                                 "sip": sip,
                                 "bare": bare, "ratio_sip_over_bare": ratio}
    return report

