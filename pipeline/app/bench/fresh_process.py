"""One side of a benchmark in a fresh Python process, timed.

Each side (a sip stage run as the user runs it, or the bare library doing the same work) gets
a process of its own, so its start-up, imports and peak memory are its own and neither side
finds the other's engine, caches or allocator warm. A bare side is a module-level function
``side(spec: dict) -> dict`` run by this module's ``__main__`` (``python -m
pipeline.app.bench.fresh_process module:function spec.json result.json``).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from pipeline.manifest import Manifest

CLI_MODULE = "pipeline.app.cli"  # `python -m` this is `sip`
_STDERR_TAIL = 3000  # characters of a failed side's stderr shown in the error


def run_python(args: list[str], what: str) -> float:
    """Run ``python args`` in a fresh process; its wall time in seconds.

    Raises:
        RuntimeError: the process failed; the message names ``what`` and ends with its stderr.
    """
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-_STDERR_TAIL:]}")
    return wall


def run_side(side: Callable[[dict], dict], spec: dict, directory: Path, name: str) -> dict:
    """``side(spec)`` in a fresh process; what it returned (JSON round-tripped).

    ``side`` must be a module-level function; the spec and the result pass through
    ``directory/<name>.json`` and ``directory/<name>.out.json``.
    """
    spec_path, result_path = directory / f"{name}.json", directory / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    run_python(["-m", __name__, f"{side.__module__}:{side.__qualname__}", str(spec_path), str(result_path)],
               f"bench: the {name} side")
    return json.loads(result_path.read_text())


def run_stage_process(manifest: Manifest, stage: str, directory: Path) -> tuple[float, dict]:
    """``sip <stage> -m <manifest>`` in a fresh process (as a user would run it).

    Returns:
        The process's wall time in seconds (imports and card included) and the summary of the
        card it wrote.
    """
    manifest_path = directory / f"{stage}-manifest.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest.absolute_data()))
    wall = run_python(["-m", CLI_MODULE, stage, "-m", str(manifest_path)], f"sip {stage}")
    return wall, json.loads((manifest.stage_dir(stage) / "card.json").read_text())["summary"]


def bare_engine_spec(manifest: Manifest, key: str) -> dict:
    """The model directory and ``vllm.LLM`` settings of the manifest's ``key`` model section
    (``rewriter`` or ``judge``), as the stage's engine gets them."""
    from pipeline.models import resolve_model_dir

    ref = getattr(manifest, key)
    return {"model": str(resolve_model_dir(manifest, ref.model, f"{key}.model")),
            "engine": {"max_model_len": ref.max_model_len, "dtype": ref.dtype, "seed": manifest.run.seed,
                       "gpu_memory_utilization": ref.gpu_memory_utilization,
                       "tensor_parallel_size": ref.tensor_parallel_size}}


def start_bare_llm(spec: dict):
    """A bare ``vllm.LLM`` from :func:`bare_engine_spec`'s settings, and its start-up in seconds
    (importing vLLM included, as the stage's engine counts it)."""
    started = time.perf_counter()
    from pipeline.engines.vllm_env import configure_vllm_env

    configure_vllm_env()
    from vllm import LLM

    from pipeline.engines.vllm_engine import llm_kwargs

    llm = LLM(**llm_kwargs(spec["model"], **spec["engine"]))
    return llm, time.perf_counter() - started


if __name__ == "__main__":  # one bare side, in its own process
    target, spec_file, result_file = sys.argv[1:4]
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(json.loads(Path(spec_file).read_text()))
    Path(result_file).write_text(json.dumps(result))
