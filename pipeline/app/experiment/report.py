"""The experiment's report: one row per arm, its seeds pooled, with 95% intervals.

Written under ``run.output_dir`` when the evaluation is done::

    experiment.json   every arm's metrics and comparisons with the baseline arm (intervals), its
                      runs' steps, tokens, wall time and judge calls, the settings
    experiment.md     the side-by-side table, the findings paragraph (generated from the
                      intervals), the plots, where every run's outputs are
    plots/metrics.png, plots/training.png (every run's curves on shared axes)

The metrics come from the evaluation's per-prompt table (``eval/prompts.parquet``, see
:mod:`stages.eval_report`), the statistics from :mod:`.stats`, the training side from each run's
``train_summary.json`` and metrics CSV.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.atomic import atomic_path, write_text_atomic
from pipeline.manifest import Manifest, fingerprint
from pipeline.app.experiment.arms import ArmRun, arm_runs, baseline_partner, run_dir
from pipeline.app.experiment.stats import (arm_estimates, difference, mean_over_seeds, perplexity_over_seeds,
                                           ratio)
from stages.eval_report import LOWER_IS_BETTER, plot_metric_bars, training_curves, versus_wins
from stages.eval_stats import Estimate

REPORT_FILES = ("experiment.md", "experiment.json", "plots")
TOXICITY_TITLES = {"toxicity": "classifier", "profanity": "word list"}


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    column: str  # of the per-prompt table ("win": both shown orders read)
    prompt_set: str | None  # None: every set but the multiple-choice one
    opponent: str = "start"  # win scores: against whom ("baseline": the run's baseline partner)


def metrics_of(prompt_sets: list[str], baseline_arm: str, independent_toxicity: str) -> list[Metric]:
    """The table's metrics, in column order, for the prompt sets the evaluation has;
    ``independent_toxicity``: the evaluation's toxicity measure no training reward used."""
    out = [Metric("win_vs_start", "win rate vs start", "win", "heldout"),
           Metric("win_vs_baseline", f"win rate vs {baseline_arm}", "win", "heldout", opponent="baseline")]
    out += [Metric(f"safety/{s}", f"safety ({s})", "safety", s) for s in prompt_sets if s != "mc"]
    out += [Metric("factuality", "factuality", "factuality", "heldout"),
            Metric("independent_toxicity", f"independent toxicity ({TOXICITY_TITLES[independent_toxicity]})",
                   independent_toxicity, None),
            Metric("repetition", "repeated 4-grams", "repetition", None),
            Metric("perplexity", "perplexity", "reference_nll", "heldout")]
    if "mc" in prompt_sets:
        out.append(Metric("mc_accuracy", "MC accuracy", "mc_accuracy", "mc"))
    return out


def _run_values(t: pl.DataFrame, manifest: Manifest, run: ArmRun, metric: Metric) -> pl.DataFrame:
    """(prompt_id, value[, tokens]) of one run for one metric, on the prompts where it is known."""
    rows = t.filter(pl.col("checkpoint") == run.name)
    rows = rows.filter(pl.col("prompt_set") == metric.prompt_set) if metric.prompt_set else \
        rows.filter(pl.col("prompt_set") != "mc")
    if metric.column == "win":
        if metric.opponent == "baseline":
            rows = versus_wins(rows, baseline_partner(manifest, run).name)
        rows = rows.drop_nulls(["win_shown_first", "win_shown_second"])
    extra = ["reference_tokens"] if metric.column == "reference_nll" else []
    return rows.select("prompt_id", pl.col(metric.column).alias("value"), *extra).drop_nulls()


def arm_metrics(t: pl.DataFrame, manifest: Manifest, metric: Metric, seed: int
                ) -> tuple[dict[str, Estimate], dict[str, Estimate]]:
    """Every arm's estimate of ``metric`` (seeds pooled) and its comparison with the baseline
    arm, on the prompts every included run has a value for. Arms without values are left out
    (the baseline arm has no win rate against itself)."""
    baseline = manifest.experiment.baseline
    runs = [r for r in arm_runs(manifest) if not (metric.opponent == "baseline" and r.arm == baseline)]
    values = {r: _run_values(t, manifest, r, metric) for r in runs}
    values = {r: v for r, v in values.items() if len(v)}
    if not values:
        return {}, {}
    shared = sorted(set.intersection(*(set(v["prompt_id"].to_list()) for v in values.values())))
    if not shared:
        return {}, {}
    columns: dict[str, list[list[np.ndarray]]] = {}
    for run, v in values.items():
        v = v.filter(pl.col("prompt_id").is_in(shared)).sort("prompt_id")
        cols = [v["value"].to_numpy().astype(np.float64)]
        if metric.column == "reference_nll":
            cols.append(v["reference_tokens"].to_numpy().astype(np.float64))
        columns.setdefault(run.arm, []).append(cols)
    arms = {a: tuple(np.stack([cols[i] for cols in per_seed]) for i in range(len(per_seed[0])))
            for a, per_seed in columns.items()}
    is_ppl = metric.column == "reference_nll"
    return arm_estimates(arms, perplexity_over_seeds if is_ppl else mean_over_seeds,
                         baseline if baseline in arms and metric.opponent != "baseline" else None,
                         compare=ratio if is_ppl else difference, seed=seed)


def _metrics_csv_rows(train_dir: Path) -> list[dict]:
    import csv

    rows: dict[float, dict] = {}
    for path in sorted(train_dir.glob("metrics/**/metrics.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("step"):
                    rows.setdefault(float(row["step"]), {}).update({k: v for k, v in row.items() if v})
    return [rows[s] for s in sorted(rows)]


def run_training(manifest: Manifest, run: ArmRun) -> dict:
    """A run's steps, tokens, wall time, online judge calls and its last rollout-chosen rate."""
    directory = run_dir(manifest, run)
    summary = json.loads((directory / "train_summary.json").read_text())
    rows = _metrics_csv_rows(directory)
    rollout_rates = [float(r["chosen_rate_rollout"]) for r in rows if "chosen_rate_rollout" in r]
    return {"dir": str(directory), "steps": summary["steps"], "tokens": summary["tokens"],
            "wall_s": summary["elapsed_s"], "judge_calls": int(sum(float(r.get("judge_calls", 0)) for r in rows)),
            "rollout_chosen_rate_end": rollout_rates[-1] if rollout_rates else None}


def _judge_stage_calls(manifest: Manifest) -> int:
    card = manifest.stage_dir("judge") / "card.json"
    return int(json.loads(card.read_text())["summary"]["judge_calls"]) if card.is_file() else 0


def _model_name(model: dict | None) -> str:
    if not model:
        return "?"
    name = "the embedded model" if model.get("kind") == "embedded" else model.get("path") or model.get("url")
    return f"{name} (weights {model['weights_sha']})" if model.get("weights_sha") else str(name)


def _fmt(e: Estimate | None, f: str = "{:.3f}") -> str:
    return "–" if e is None else f"{f.format(e.value)} [{f.format(e.low)}, {f.format(e.high)}]"


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def findings(data: dict) -> list[str]:
    """Sentences generated from the intervals: which arm differs from the baseline arm (and the
    start) on which metric, and in which direction; nothing else is claimed."""
    baseline, lines = data["baseline"], []
    titles = {m["key"]: m["title"] for m in data["metrics"]}
    for arm, a in data["arms"].items():
        if arm == baseline:
            continue
        better, worse = [], []
        for key, e in a["vs_baseline"].items():
            null = 1.0 if key == "perplexity" else 0.0
            if e["low"] <= null <= e["high"]:
                continue
            up = e["value"] > null
            good = not up if key.split("/")[0] in LOWER_IS_BETTER else up
            sign = "×" if key == "perplexity" else ("+" if up else "")
            (better if good else worse).append(f"{titles[key]} ({sign}{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}])")
        win = a["metrics"].get("win_vs_baseline")
        if win and not win["low"] <= 0.5 <= win["high"]:
            (better if win["value"] > 0.5 else worse).append(
                f"head-to-head win rate {win['value']:.3f} [{win['low']:.3f}, {win['high']:.3f}]")
        if better or worse:
            parts = ([f"better than {baseline} on " + "; ".join(better)] if better else []) + \
                    (["worse on " + "; ".join(worse)] if worse else [])
            lines.append(f"- **{arm}** is " + ", and ".join(parts) + ".")
        else:
            lines.append(f"- **{arm}**: no difference from {baseline} has a 95% interval that excludes no change.")
    for arm, a in data["arms"].items():
        win = a["metrics"].get("win_vs_start")
        if win and not win["low"] <= 0.5 <= win["high"]:
            lines.append(f"- **{arm}** {'beats' if win['value'] > 0.5 else 'loses to'} the starting model "
                         f"(win rate {win['value']:.3f} [{win['low']:.3f}, {win['high']:.3f}]).")
    return lines


def table(data: dict) -> str:
    """The markdown table: rows = arms; metric columns with 95% intervals (and, under each, the
    difference from the baseline arm: Δ, or × for perplexity), then the training columns."""
    metrics = [m for m in data["metrics"] if any(m["key"] in a["metrics"] for a in data["arms"].values())]
    head = ["arm", "seeds", *(m["title"] for m in metrics), "rollout-chosen rate (end)", "judge calls (online)",
            "steps", "tokens", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm, a in data["arms"].items():
        cells = [arm + (" (baseline)" if arm == data["baseline"] else ""), str(len(a["runs"]))]
        for m in metrics:
            f = "{:,.1f}" if m["key"] == "perplexity" else "{:.3f}"
            e = a["metrics"].get(m["key"])
            cell = _fmt(Estimate(**e) if e else None, f)
            if (d := a["vs_baseline"].get(m["key"])) is not None:
                sym = "×" if m["key"] == "perplexity" else "Δ"
                cell += f"<br>{sym} {_fmt(Estimate(**d), '{:.3f}' if sym == '×' else '{:+.3f}')}"
            cells.append(cell)
        t = a["training"]
        rate = t["rollout_chosen_rate_end"]
        cells += ["–" if rate is None else f"{rate:.2f}", f"{t['judge_calls']:,.0f}", f"{t['steps']:,.0f}",
                  f"{t['tokens']:,.0f}", f"{t['wall_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_metrics(data: dict, path: Path) -> None:
    plot_metric_bars({arm: {k: Estimate(**e) for k, e in a["metrics"].items()} for arm, a in data["arms"].items()},
                     [m["key"] for m in data["metrics"]], path, titles={m["key"]: m["title"] for m in data["metrics"]},
                     suptitle="sip experiment: per arm (seeds pooled), with 95% bootstrap intervals")


def _plot_training(manifest: Manifest, path: Path) -> None:
    """Every run's loss, DPO margin and rollout-chosen rate against its optimizer step, one
    colour per arm, one line style per seed, on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss (each phase's objective)", "loss"), ("DPO margin", "dpo_margin"),
              ("rollout-chosen rate", "chosen_rate_rollout")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = list(manifest.experiment.arms)
    for run in arm_runs(manifest):
        phases = [p.name for p in manifest.experiment.arms[run.arm].phases]
        curves = training_curves(run_dir(manifest, run), phases)
        style = ["-", "--", ":", "-."][manifest.experiment.arm_seeds(run.arm).index(run.seed) % 4]
        colour = colours[arms.index(run.arm) % len(colours)]
        for ax, (_, key) in zip(axes[0], panels):
            points = sorted(p for name, pts in curves.items() if name.split(":")[0] == key for p in pts)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, linestyle=style, color=colour, marker=".", label=run.name)
    for ax, (title, _) in zip(axes[0], panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_experiment_report(manifest: Manifest, eval_out: Path, eval_metrics: dict) -> dict:
    """Writes experiment.json, experiment.md and the plots under ``run.output_dir``; returns
    experiment.json's content.

    Args:
        manifest: the experiment manifest.
        eval_out: the evaluation's directory (its ``prompts.parquet`` is read).
        eval_metrics: the evaluation's metrics.json content (its prompts and judge calls).
    """
    out, exp, seed = manifest.output_root, manifest.experiment, manifest.run.seed
    t = pl.read_parquet(eval_out / "prompts.parquet")
    prompt_sets = sorted(t["prompt_set"].unique())
    metrics = metrics_of(prompt_sets, exp.baseline, eval_metrics["independent_toxicity"])
    arms: dict[str, dict] = {a: {"runs": {}, "metrics": {}, "vs_baseline": {}} for a in exp.arms}
    for m in metrics:
        values, versus = arm_metrics(t, manifest, m, seed)
        for a, e in values.items():
            arms[a]["metrics"][m.key] = e.as_dict()
        for a, e in versus.items():
            arms[a]["vs_baseline"][m.key] = e.as_dict()
    for run in arm_runs(manifest):
        arms[run.arm]["runs"][run.name] = run_training(manifest, run)
    for a in arms.values():
        runs = list(a["runs"].values())
        a["training"] = {k: _mean([r[k] for r in runs]) for k in ("steps", "tokens", "wall_s", "judge_calls",
                                                                   "rollout_chosen_rate_end")}
    data = {
        "name": manifest.run.name, "baseline": exp.baseline, "prompts": eval_metrics["prompts"],
        "metrics": [{"key": m.key, "title": m.title} for m in metrics if any(m.key in a["metrics"] for a in arms.values())],
        "arms": arms,
        "eval": {"report": str(eval_out / "report.md"), "judge_calls": eval_metrics["judge"]["calls"],
                 "judge": eval_metrics["judge"]["model"]},
        "judge_stage_calls": _judge_stage_calls(manifest),
        "settings": {"manifest_fingerprint": fingerprint(manifest),
                     "arms": {a: [p.model_dump(mode="json") for p in arm.phases] for a, arm in exp.arms.items()},
                     "seeds": {a: exp.arm_seeds(a) for a in exp.arms}},
    }
    (out / "plots").mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experiment.json", json.dumps(data, indent=1) + "\n")
    _plot_metrics(data, out / "plots" / "metrics.png")
    _plot_training(manifest, out / "plots" / "training.png")
    n = ", ".join(f"{v} {k}" for k, v in data["prompts"].items())
    text = [
        f"# sip experiment: {manifest.run.name}", "",
        f"Arms trained from one start on the same prefixes; baseline arm **{exp.baseline}**. Prompts: {n}. Each "
        "cell is the arm's value (the mean over its seeds) with a 95% bootstrap interval over prompts and seeds "
        "(2000 resamples); under it, Δ is the difference from the baseline arm (× the perplexity ratio) on the "
        "same prompts. A win rate of 0.5 means no difference; win rates against the baseline arm pair each seed "
        "with the baseline run of the same seed where there is one.", "",
        table(data), "",
        "## Findings", "",
        "Generated from the intervals above: a difference is named only when its 95% interval excludes no change.",
        "", *(findings(data) or ["- No difference has an interval that excludes no change."]), "",
        "![metrics](plots/metrics.png)", "",
        "## Training", "", "![training curves](plots/training.png)", "",
        "## Where everything is", "",
        f"- judge: {_model_name(data['eval']['judge'])}; the judge stage made {data['judge_stage_calls']:,} calls "
        "once, for the preferences the offline arms read; the table's online column counts each run's own calls",
        f"- evaluation: `{eval_out / 'report.md'}` (every checkpoint, with examples); {data['eval']['judge_calls']:,} "
        "judge calls",
        *(f"- {name}: `{r['dir']}`" for a in arms.values() for name, r in a["runs"].items()),
        f"- every number: `experiment.json`; manifest fingerprint {data['settings']['manifest_fingerprint']}", "",
    ]
    write_text_atomic(out / "experiment.md", "\n".join(text))
    return data


def printed_table(data: dict) -> str:
    """The table of an experiment.json, for the terminal."""
    return table(data).replace("<br>", "  ")
