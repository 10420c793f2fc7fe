"""The ``sip`` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from pipeline.errors import SipError
from pipeline.manifest import Manifest, ManifestError, fingerprint, load_manifest

manifest_option = click.option(
    "-m", "--manifest", "manifest_path", default="manifests/demo.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="The run's manifest (YAML).",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a manifest key, e.g. --set executor.tasks=8 (repeatable).",
)
executor_option = click.option(
    "--executor", type=click.Choice(["local", "slurm"]), default=None, help="Override executor.type."
)


def _load(manifest_path: str, overrides: tuple[str, ...], executor: str | None = None) -> Manifest:
    extra = list(overrides) + ([f"executor.type={executor}"] if executor else [])
    return load_manifest(manifest_path, extra)


@click.group()
@click.version_option(package_name="sip-pretrain")
@click.pass_context
def main(ctx: click.Context) -> None:
    """sip: Self-Improving Pretraining pipeline (shard, rewrite, judge, train)."""
    from pipeline.plans import planning_once

    ctx.with_resource(planning_once())  # each stage planned once per command


@main.group()
def manifest() -> None:
    """Validate and show manifests."""


@manifest.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@set_option
def manifest_check(path: str, overrides: tuple[str, ...]) -> None:
    """Validate PATH and print the resolved manifest, its fingerprint and whether the longest
    pair fits each model's context (what to change when it does not)."""
    from stages.fit import fit_lines

    m = _load(path, overrides)
    click.echo(yaml.safe_dump(m.model_dump(mode="json"), sort_keys=False).rstrip())
    click.echo(f"# fingerprint: {fingerprint(m)}")
    click.echo("# fit: the longest pair's prompt + output in each model's tokens, against its context")
    from stages.judge import check_judge_settings

    if m.judge is not None:
        try:
            check_judge_settings(m)  # what the judge stage would refuse, said here too
        except ManifestError as exc:
            click.echo(f"#   judge: REFUSED: the stage will not start: {exc}")
    for line in fit_lines(m, ("rewriter", "judge", "policy")):
        click.echo(f"#   {line}")


@main.command()
@click.option("--model/--no-model", default=True, help="Fetch and convert the embedded model.")
@click.option("--corpus/--no-corpus", default=True, help="Fetch the demo corpus.")
def assets(model: bool, corpus: bool) -> None:
    """Fetch the embedded default (SmolLM2-135M-Instruct and the demo corpus) into the cache."""
    from pipeline import assets as a

    if corpus:
        click.echo(f"corpus:      {a.embedded_corpus()}")
    if model:
        click.echo(f"model (HF):  {a.embedded_model()}")
        click.echo(f"model (lit): {a.embedded_litgpt()}")


def _run(names: list[str], manifest_path, overrides, executor, force, dry_run, wait) -> None:
    from pipeline.app.registry import JOBS, SUMMARY_LINES, run_stages

    m = _load(manifest_path, overrides, executor)
    then = None
    if "train" in names:  # not a batch stage: the trainer ends the chain (afterok on Slurm)
        from trainer.job import train_job

        names = [n for n in names if n != "train"]
        then = train_job(m, upstream_pending=bool(names), log=click.echo)
    cards = run_stages(m, names, force=force, dry_run=dry_run, wait=wait, log=click.echo, then=then)
    for name, card in cards.items():
        out = m.stage_dir(name)
        card_file = f" (card: {out / 'README.md'})" if name in JOBS else ""  # train writes no dataset card
        click.echo(f"{SUMMARY_LINES[name](card)}\n    -> {out}{card_file}")


def stage_options(fn):
    for option in reversed([
        manifest_option, set_option, executor_option,
        click.option("--force", is_flag=True, help="Delete the stage's outputs and start over."),
        click.option("--dry-run", is_flag=True, help="Show what would run (the sbatch script on Slurm); run nothing."),
        click.option("--wait/--no-wait", default=True, help="Slurm: wait for the jobs to finish."),
    ]):
        fn = option(fn)
    return fn


@main.command()
@stage_options
def shard(manifest_path, overrides, executor, force, dry_run, wait) -> None:
    """Cut the corpus into prefix/suffix pairs (the pairs table)."""
    _run(["shard"], manifest_path, overrides, executor, force, dry_run, wait)


@main.command()
@stage_options
def rewrite(manifest_path, overrides, executor, force, dry_run, wait) -> None:
    """Rewrite every pair's suffix with the rewriter model (the rewrites table)."""
    _run(["rewrite"], manifest_path, overrides, executor, force, dry_run, wait)


@main.command()
@stage_options
def rollout(manifest_path, overrides, executor, force, dry_run, wait) -> None:
    """Sample rollouts.count continuations per prefix from the policy (the rollouts table)."""
    _run(["rollout"], manifest_path, overrides, executor, force, dry_run, wait)


@main.command()
@stage_options
def judge(manifest_path, overrides, executor, force, dry_run, wait) -> None:
    """Judge every pair's candidates (the judgments table)."""
    _run(["judge"], manifest_path, overrides, executor, force, dry_run, wait)


@main.command()
@stage_options
def prefs(manifest_path, overrides, executor, force, dry_run, wait) -> None:
    """Turn judgments into the preferences table and its SFT view."""
    _run(["prefs"], manifest_path, overrides, executor, force, dry_run, wait)


@main.command("run")
@click.option("--stages", "stage_list", default="shard,rewrite,rollout,judge,prefs", show_default=True,
              help="Comma-separated stages; on Slurm they are queued as one afterok chain (rollout is skipped "
                   "when rollouts.count is 0).")
@stage_options
def run_cmd(stage_list, manifest_path, overrides, executor, force, dry_run, wait) -> None:
    """Run several stages in order (skipping complete ones)."""
    _run([s.strip() for s in stage_list.split(",") if s.strip()], manifest_path, overrides, executor, force, dry_run, wait)


@main.command()
@manifest_option
@set_option
@executor_option
@click.option("--force", is_flag=True, help="Delete the train outputs (checkpoints, metrics) and start over.")
@click.option("--dry-run", is_flag=True, help="Print the plan (phases, steps, tokens; on Slurm the sbatch script); "
              "train nothing (the tables are converted into the run's table cache, as a run would).")
@click.option("--wait/--no-wait", default=True, help="Slurm: wait for the job to finish.")
def train(manifest_path, overrides, executor, force, dry_run, wait) -> None:
    """Train the policy through the manifest's train.phases (resumes from the latest checkpoint).

    With the Slurm executor: one sbatch job, srun starting one task per device."""
    from trainer.loop import run_train

    m = _load(manifest_path, overrides, executor)
    if m.executor.for_stage("train").type == "slurm":
        _run(["train"], manifest_path, overrides, executor, force, dry_run, wait)
    else:
        run_train(m, force=force, dry_run=dry_run, log=click.echo)


@main.command("eval")
@stage_options
@click.option("--rejudge", is_flag=True, help="Judge again, keeping the generations (after changing eval.baseline "
              "or the judge).")
def eval_cmd(manifest_path, overrides, executor, force, dry_run, wait, rejudge) -> None:
    """Evaluate eval.checkpoints against eval.baseline: continuations of held-out and unsafe
    prompts, judged for quality (win rate), safety and factuality, with perplexity and
    repetition; writes <output_dir>/eval/report.md, metrics.json, prompts.parquet and plots/."""
    from pipeline.app.evaluate import run_eval

    run_eval(_load(manifest_path, overrides, executor), force=force, rejudge=rejudge, dry_run=dry_run, wait=wait,
             log=click.echo)


@main.command("experiment")
@click.option("-m", "--manifest", "manifest_path", default="manifests/experiment.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Experiment manifest (YAML) with an experiment section.")
@set_option
@executor_option
@click.option("--force", is_flag=True, help="Start every step over: the data stages, every run, the evaluation.")
@click.option("--redo", "redo_names", multiple=True, metavar="ARM",
              help="Train this arm again (every seed), then evaluate again; 'eval': evaluate again (repeatable).")
@click.option("--dry-run", is_flag=True, help="Show the data stages' plans and the runs; run nothing.")
def experiment_cmd(manifest_path, overrides, executor, force, redo_names, dry_run) -> None:
    """Train every arm of experiment.arms (each seed) from one start on the same data, evaluate them
    against the start and the baseline arm, and write <output_dir>/experiment.md (one row per arm,
    95% intervals over prompts and seeds), experiment.json and plots/."""
    from pipeline.app.experiment import run_experiment

    run_experiment(_load(manifest_path, overrides, executor), force=force, redo_names=list(redo_names),
                   dry_run=dry_run, log=click.echo)


@main.command("ref-logps")
@manifest_option
@set_option
@click.option("--phase", default=None, help="DPO phase name (default: the first DPO phase).")
@click.option("--checkpoint", type=click.Path(file_okay=False, exists=True), default=None,
              help="Reference checkpoint (required when the DPO phase is not the first phase).")
@click.option("--clear", is_flag=True, help="Remove stored reference log-probs instead.")
def ref_logps(manifest_path, overrides, phase, checkpoint, clear) -> None:
    """Store a DPO phase's reference log-probs beside its preferences table (under train/ref_logps/)."""
    from trainer.ref_logps import run_ref_logps

    run_ref_logps(_load(manifest_path, overrides), phase=phase, checkpoint=Path(checkpoint) if checkpoint else None,
                  clear=clear, log=click.echo)


@main.command("judge-check")
@manifest_option
@set_option
@click.option("--limit", default=40, show_default=True, type=click.IntRange(min=1),
              help="Items per class: N safe + N unsafe texts, N pairs per corruption kind (N true + N false claims).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Report file; default: judge_check.json in the judge stage dir (or run.output_dir before it exists).")
def judge_check(manifest_path: str, overrides: tuple[str, ...], limit: int, json_path: str | None) -> None:
    """How well the manifest's judge separates labelled texts, in its modes (accuracy/AUC, parse rate, cost)."""
    from pipeline.app.judge_check.checks import default_json_path, format_table, run_judge_check, write_report

    m = _load(manifest_path, overrides)
    report = run_judge_check(m, limit, log=click.echo)
    path = write_report(report, Path(json_path) if json_path else default_json_path(m))
    click.echo(format_table(report))
    click.echo(f"    -> {path}")


@main.command("judge-compare")
@manifest_option
@set_option
@click.option("--limit", default=40, show_default=True, type=click.IntRange(min=1),
              help="Pairs (with three or more candidates) whose every ordered comparison is judged.")
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(min=1),
              help="Seeds each scheme (and the noise ceiling) is replayed with.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Report file; default: judge_compare.json in run.output_dir.")
def judge_compare(manifest_path: str, overrides: tuple[str, ...], limit: int, seeds: int, json_path: str | None) -> None:
    """What each quality comparison scheme costs and how often it picks all-pairs' DPO pair, on
    this judge and these candidates (needs the shard, rewrite and rollout tables)."""
    from pipeline.app.judge_compare import format_table, run_judge_compare, write_report

    m = _load(manifest_path, overrides)
    report = run_judge_compare(m, limit, seeds, log=click.echo)
    path = write_report(report, Path(json_path) if json_path else m.output_root / "judge_compare.json")
    click.echo(format_table(report))
    click.echo(f"-> {path}")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("-n", "rows", default=3, show_default=True, help="Rows to show.")
def inspect(path: str, rows: int) -> None:
    """Print schema, provenance, row count and a few rows of a sip table (file or stage dir)."""
    from pipeline.describe import describe

    click.echo(describe(Path(path), rows))


@main.group()
def bench() -> None:
    """Benchmarks (rerunnable; they print ratios against the bare library on the same work)."""


@bench.command("shard")
@manifest_option
@set_option
@click.option("--processes", default=2, show_default=True)
@click.option("--copies", default=1, show_default=True, help="Repeat the corpus this many times (steady state).")
def bench_shard(manifest_path: str, overrides: tuple[str, ...], processes: int, copies: int) -> None:
    """Shard throughput vs bare batch tokenization of the same documents."""
    from pipeline.app.bench.shard import bench_shard as run_bench

    click.echo(json.dumps(run_bench(_load(manifest_path, overrides), processes, copies=copies), indent=1))


@bench.command("train")
@manifest_option
@set_option
@click.option("--objectives", default="ntp,dpo", show_default=True, help="Comma-separated: ntp, dpo.")
@click.option("--model", default=None, help="Default: the manifest's train.model (else the policy). Or 'policy', a "
              "LitGPT config name, a YAML mapping of litgpt.Config fields, or a LitGPT checkpoint directory.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: the manifest phase's.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Default: train.max_seq_len.")
@click.option("--warmup", type=click.IntRange(min=1), default=2, show_default=True, help="Untimed steps first.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Timed steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs per side, alternating which goes first; the best of each is reported.")
def bench_train_cmd(manifest_path, overrides, objectives, model, batch_size, seq_len, warmup, steps, repeats) -> None:
    """Trainer tokens/s and peak memory vs a bare LitGPT + AdamW loop on the same model and batches."""
    from pipeline.app.bench.train import bench_train

    report = bench_train(_load(manifest_path, overrides), objectives=tuple(o.strip() for o in objectives.split(",")),
                         model=model, batch_size=batch_size, seq_len=seq_len, warmup=warmup, steps=steps,
                         repeats=repeats)
    click.echo(json.dumps(report, indent=1))


@bench.command("rewrite")
@manifest_option
@set_option
@click.option("--pairs", default=64, show_default=True)
@click.option("--server/--no-server", default=True, help="Also time the same requests through `vllm serve` over HTTP.")
def bench_rewrite_cmd(manifest_path: str, overrides: tuple[str, ...], pairs: int, server: bool) -> None:
    """Rewrite stage output tokens/s vs bare vLLM on the same prompts and settings."""
    from pipeline.app.bench.rewrite import bench_rewrite

    click.echo(json.dumps(bench_rewrite(_load(manifest_path, overrides), pairs, server), indent=1))


@bench.command("judge")
@manifest_option
@set_option
@click.option("--pairs", default=48, show_default=True)
def bench_judge_cmd(manifest_path: str, overrides: tuple[str, ...], pairs: int) -> None:
    """Judge stage candidates/s and prompt tokens/s vs bare vLLM making the same calls."""
    from pipeline.app.bench.judge import bench_judge

    click.echo(json.dumps(bench_judge(_load(manifest_path, overrides), pairs), indent=1))


@bench.command("chaos")
@manifest_option
@set_option
@click.option("--stages", default="shard,rewrite,rollout,judge,prefs,train-offline,train-online", show_default=True,
              help="Comma-separated stages to kill and resume (train-offline, train-online: the manifest's "
                   "offline or online training phases).")
@click.option("--kills", type=click.IntRange(min=0), default=20, show_default=True, help="SIGKILLs per stage.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the kill moments.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="outputs/chaos", show_default=True,
              help="Where the reference and chaos runs are written.")
def bench_chaos_cmd(manifest_path: str, overrides: tuple[str, ...], stages: str, kills: int, seed: int,
                    directory: str) -> None:
    """Each stage and training SIGKILLed at random moments and resumed, vs an uninterrupted run: rows
    lost, duplicated; for training, steps and losses."""
    from pipeline.app.bench.chaos import ORDER, bench_chaos, table

    names = [s.strip() for s in stages.split(",") if s.strip()]
    if not names or any(s not in ORDER for s in names):
        raise click.BadParameter(f"expected stages among {', '.join(ORDER)}, got {stages!r}", param_hint="--stages")
    report = bench_chaos(_load(manifest_path, overrides), Path(directory), names, kills, seed, log=click.echo)
    click.echo(table(report))
    click.echo(json.dumps(report, indent=1))


@bench.command("memory")
@click.option("--pairs", "sizes", type=click.IntRange(min=1), multiple=True, show_default=True,
              default=(10_000, 100_000, 1_000_000), help="Pairs of one synthetic run (repeatable).")
@click.option("--tasks", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tasks of the judge and prefs stages (fixed while the corpus grows).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="outputs/bench-memory",
              show_default=True, help="Where the synthetic runs are written and kept.")
def bench_memory_cmd(sizes: tuple[int, ...], tasks: int, directory: str) -> None:
    """Peak memory of a judge task, a prefs task and a training rank's data loading as the corpus grows
    (synthetic tables, no LLM)."""
    from pipeline.app.bench.memory import bench_memory, table

    if any(p.exists() and not p.is_dir() for p in (Path(directory), *Path(directory).parents)):
        raise click.BadParameter(f"{directory} is not a directory (or lies under a file)", param_hint="--dir")
    report = bench_memory(Path(directory), list(sizes), tasks)
    click.echo(table(report))
    click.echo(json.dumps(report, indent=1))


@bench.command("online")
@manifest_option
@set_option
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True, help="Online steps run.")
@click.option("--pairs", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs in the shard table.")
@click.option("--scheme", "schemes", multiple=True,
              type=click.Choice(["all_pairs", "pivot", "tournament", "sparse_bt", "adaptive"]),
              help="Also run the same steps with this judging.quality.scheme (repeatable); reports each one's "
                   "judge calls and step time against the manifest's scheme.")
@click.option("--rollouts", type=click.IntRange(min=1), default=None,
              help="Rollouts per prefix (replaces the online phase's online.rollouts).")
def bench_online_cmd(manifest_path: str, overrides: tuple[str, ...], steps: int, pairs: int,
                     schemes: tuple[str, ...], rollouts: int | None) -> None:
    """An online phase's step time split, rollout tokens/s and judge calls/s vs bare vLLM doing the same work."""
    from pipeline.app.bench.online import bench_online

    report = bench_online(_load(manifest_path, overrides), steps, pairs, schemes, rollouts)
    click.echo(json.dumps(report, indent=1))


def _entry() -> None:
    """The ``sip`` console script: a :class:`~pipeline.errors.SipError` is printed as one
    ``Error:`` line (no traceback) with exit code 2; click's own errors as click prints them."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SipError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    _entry()
