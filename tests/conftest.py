"""Shared fixtures: the embedded tokenizer, manifest writers and a subprocess `sip` runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.engines.base import Engine, Result

REPO = Path(__file__).resolve().parents[1]
# The `sip` command as a fresh process: this interpreter and this checkout's code, whatever
# `sip` script is on the PATH.
SIP = (sys.executable, "-m", "pipeline.app.cli")


@pytest.fixture
def one_thread():
    """The tiny model is fastest on one thread, and the suite shares the machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded model's HF directory (built once per cache; ~1 min the first time)."""
    from pipeline import assets

    return assets.embedded_model(log=lambda _msg: None)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from pipeline.tokenizer import load_tokenizer

    return load_tokenizer(str(embedded_dir))


def base_manifest(output_dir: Path, corpus: list[str], **sections) -> dict:
    data = {
        "run": {"name": "test", "output_dir": str(output_dir), "seed": 7},
        "corpus": {"paths": corpus, "text_key": "text", "id_key": "id"},
        "policy": {"model": "embedded"},
        "shard": {"suffix_tokens": 16, "min_prefix_tokens": 8, "max_prefix_tokens": 64, "pairs_per_document": 2},
        "executor": {"type": "local", "tasks": 2, "workers": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def write_manifest(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def run_sip(*args: str, check: bool = True, timeout: int = 600, env: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*SIP, *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env or {**os.environ}, **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sip {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def wiki_documents(n: int, words: int = 120) -> list[dict]:
    """Deterministic documents made of real English sentences from the demo corpus."""
    from pipeline import assets

    rows = []
    for part in sorted(assets.embedded_corpus(log=lambda _m: None).glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            doc = json.loads(line)
            if len(doc["text"].split()) >= words:
                rows.append({"id": doc["id"], "text": doc["text"], "kind": doc["kind"]})
                if len(rows) == n:
                    return rows
    return rows


def llm_manifest(root: Path, docs: list[dict], **sections) -> Path:
    """A one-task manifest over ``docs`` with the embedded model as rewriter and judge, 16-token
    suffixes and small chunks (several chunk files from a few pairs); ``sections`` update it."""
    write_jsonl(root / "corpus.jsonl", docs)
    data = base_manifest(root / "out", [str(root / "corpus.jsonl")],
                         shard={"suffix_tokens": 16, "min_prefix_tokens": 16, "max_prefix_tokens": 96},
                         executor={"tasks": 1, "workers": 1})
    data["rewriter"] = {"model": "embedded", "max_model_len": 1024}
    data["judge"] = {"model": "embedded", "max_model_len": 1024}
    data["rewrite"] = {"chunk_size": 16}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return write_manifest(root / "manifest.yaml", data)


def kill_after_first_chunk(stage: str, manifest: Path, stage_dir: Path, timeout_s: float = 600) -> dict[str, int]:
    """Start `sip <stage>`, SIGKILL its whole process group once the first chunk file appears,
    and return the chunk files present then ({name: mtime_ns})."""
    proc = subprocess.Popen([*SIP, stage, "-m", str(manifest)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, killed = time.monotonic() + timeout_s, False
    try:
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            if list(stage_dir.glob("*.parquet")):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not killed:  # timed out, or the test was interrupted
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed, f"sip {stage} ended (rc {proc.returncode}) or wrote no chunk in {timeout_s} s before the kill"
    return {p.name: p.stat().st_mtime_ns for p in stage_dir.glob("*.parquet")}


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node cluster from scripts/slurm.sh; required under CI, skipped elsewhere."""
    try:
        ok = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
        up = ok.returncode == 0 and any(s in ok.stdout for s in ("idle", "mix", "alloc"))
    except (FileNotFoundError, subprocess.TimeoutExpired):
        up = False
    if not up:
        if os.environ.get("CI") == "true":
            pytest.fail("Slurm is not running; CI must start it with scripts/slurm.sh start")
        pytest.skip("no Slurm cluster here (start one with `make slurm-up`)")
    return True


def slurm_job_times(job_id: str) -> tuple[str, str]:
    """(StartTime, EndTime) of a Slurm job, from scontrol (no accounting database needed)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
    return fields["StartTime"], fields["EndTime"]


class ScriptedJudge(Engine):
    """An engine whose answers are scripted texts, not a model: it fixes what a judge says so the
    judge's own logic (verdict reading, aggregation) can be checked by hand. Never a stand-in
    for vLLM in a test of vLLM.

    ``script(user_message)`` gives the judge's samples for one prompt: (answer, verdict) pairs,
    one per sample or one for all. ``answer`` is what it writes freely (vLLM semantics: the
    text stops before the first of the request's stop strings); ``verdict`` ("NO", "2",
    "Definite") is what it chooses when its answer is continued with the verdict's lead-in
    (None: no verdict comes back).
    With a ``tokenizer`` it is a local judge (the verdict step reads next-token log-probs, the
    chosen verdict 0.9 of the mass); without one, an endpoint (the step is a generate call
    restricted to ``Sampling.choices``). ``users`` keeps every user message it was sent.
    """

    model_id, max_model_len = "scripted", 4096

    def __init__(self, script, tokenizer=None):
        self.script, self.tokenizer = script, tokenizer
        self.users: list[str] = []
        self._pending: dict[str, list[list]] = {}  # user message -> [stopped answer, verdict, used]
        self._prompts: list = []  # requests by the fake prompt id a local judge hands out

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            user = r.messages[-1]["content"]
            if getattr(sampling, "choices", ()):  # the verdict step (endpoint)
                said = self._verdict(r)
                text = " I cannot decide." if said is None else next(c for c in sampling.choices if c.strip() == said)
                out.append(Result(r.id, texts=[text], prompt_tokens=12, completion_tokens=1))
                continue
            self.users.append(user)
            samples = self.script(user)
            samples = samples * sampling.n if len(samples) == 1 else samples
            assert len(samples) == sampling.n, "script one sample, or judging.samples of them"
            texts = [self._stopped(text, sampling.stop) for text, _ in samples]
            self._pending.setdefault(user, []).extend([t, v, False] for t, (_, v) in zip(texts, samples))
            out.append(Result(r.id, texts=texts, finish_reasons=["stop"] * len(texts), prompt_tokens=10,
                              completion_tokens=5 * len(texts)))
        return out

    @staticmethod
    def _stopped(text: str, stop) -> str:
        cuts = [text.index(s) for s in stop if s in text]
        return text[: min(cuts)] if cuts else text

    def _verdict(self, request) -> str:
        """The verdict of the sample whose answer this verdict step continues."""
        for entry in self._pending[request.messages[-1]["content"]]:
            answer, verdict, used = entry
            if not used and request.prefill.startswith(answer.rstrip(" \n*#>_-")):
                entry[2] = True
                return verdict
        raise AssertionError(f"no scripted answer continues {request.prefill!r}")

    def prompt_ids(self, request) -> list[int]:
        self._prompts.append(request)
        return [len(self._prompts) - 1]

    def next_token_logprobs(self, sequences, token_ids):
        import math

        from pipeline.tokenizer import encode_continuation
        from stages.verdicts import CHOICES

        out = []
        for (index,) in sequences:
            request = self._prompts[index]
            # The lead-in, and the start all choices share when the judge reads them after it.
            lead, shared = next((lead, shared) for lead, choices in CHOICES.values()
                                for shared in ("", os.path.commonprefix(list(choices)))
                                if request.prefill.endswith(lead + shared))
            verdict = self._verdict(request)
            if verdict is None:
                out.append(None)
                continue
            said = encode_continuation(self.tokenizer, lead + shared, (" " + verdict)[len(shared):])[0]
            assert said in token_ids
            out.append({t: math.log(0.9 if t == said else 0.1 / (len(token_ids) - 1)) for t in token_ids})
        return out



def data_block(user: str, tag: str) -> str:
    """The text of a judge prompt's one <tag> data block: the lines between a line "<tag>" and a
    line "</tag>", each there exactly once."""
    lines = user.split("\n")
    assert lines.count(f"<{tag}>") == lines.count(f"</{tag}>") == 1, tag
    return "\n".join(lines[lines.index(f"<{tag}>") + 1 : lines.index(f"</{tag}>")])
