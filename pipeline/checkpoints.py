"""Where the trainer leaves its models, and which model a name in ``eval.checkpoints`` means.

The trainer (``trainer/loop.py``) writes under ``<output_dir>/train/``::

    start/            a from-scratch model's initial weights (LitGPT directory)
    phases/<name>/    each phase's final model (LitGPT directory), kept whatever keep_last prunes
    final/            the last checkpoint
    hf/               final/ exported for Hugging Face and vLLM

A LitGPT directory holds ``lit_model.pth`` and ``model_config.yaml``; a Hugging Face directory
``config.json`` and ``*.safetensors``. Both are accepted wherever a model path is.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pipeline.manifest import Manifest
from pipeline.models import ModelNotFound

LIT_WEIGHTS_FILE = "lit_model.pth"
LIT_CONFIG_FILE = "model_config.yaml"
START_DIR = "start"
PHASES_DIR = "phases"
FINAL_DIR = "final"


def initial_model_dir(manifest: Manifest) -> Path | None:
    """The LitGPT checkpoint ``train.model.init`` names, or None for a from-scratch model.

    Raises:
        ModelNotFound: the directory is not a LitGPT checkpoint (naming the manifest key).
    """
    from pipeline import assets

    init = manifest.train.model.init
    if init == "scratch":
        return None
    if init == "policy":
        if manifest.policy.model == "embedded":
            return assets.embedded_litgpt(log=lambda _m: None)
        directory = manifest.resolve_path(manifest.policy.model)
        key = "policy.model (train.model.init: policy)"
    else:
        directory = manifest.resolve_path(init)
        key = "train.model.init"
    for name in (LIT_WEIGHTS_FILE, LIT_CONFIG_FILE):
        if not (directory / name).is_file():
            raise ModelNotFound(f"{key}: {directory} is not a LitGPT checkpoint directory (no {name}); convert an HF "
                                "model with `litgpt convert_to_litgpt DIR --model_name NAME` first")
    return directory


def resolve_checkpoint(manifest: Manifest, name: str, ref: str) -> Path:
    """The directory of ``eval.checkpoints[name] = ref``.

    ``ref``: ``start`` (the policy before training: ``train/start/`` for a from-scratch model,
    else ``train.model.init``'s checkpoint), ``final``, ``phase:<phase name>``, or a path
    (relative to the manifest) to a LitGPT or Hugging Face directory.

    Raises:
        ModelNotFound: the model does not exist (yet), naming the key and what to run.
    """
    key = f"eval.checkpoints.{name}"
    train_dir = manifest.stage_dir("train")
    if ref == "start":
        if manifest.train is None:
            raise ModelNotFound(f"{key}: 'start' needs a train section (the model training starts from)")
        directory = initial_model_dir(manifest) or train_dir / START_DIR
    elif ref == "final":
        directory = train_dir / FINAL_DIR
    elif ref.startswith("phase:"):
        phase = ref.removeprefix("phase:")
        names = [p.name for p in manifest.train.phases] if manifest.train else []
        if phase not in names:
            raise ModelNotFound(f"{key}: {ref!r} names no phase of train.phases ({', '.join(names) or 'none'})")
        directory = train_dir / PHASES_DIR / phase
    else:
        directory = manifest.resolve_path(ref)
    if not (directory / LIT_WEIGHTS_FILE).is_file() and not (directory / "config.json").is_file():
        made_by = "" if ref not in ("start", "final") and not ref.startswith("phase:") else \
            " (the trainer writes it: run `sip train` first)"
        raise ModelNotFound(f"{key}: {ref!r} -> {directory} holds no model{made_by}")
    return directory


def weights_sha(directory: Path) -> str:
    """sha256 (first 16 hex digits) of a model directory's weight files' contents, in name
    order: two checkpoints of the same shapes get different values, unlike
    :func:`pipeline.models.model_fingerprint`, which looks at sizes only. Hashed once per
    process for files of the same size, modification and change times and inode."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and
                   (p.name == LIT_WEIGHTS_FILE or p.suffix in (".safetensors", ".bin")))
    if not files:
        raise ModelNotFound(f"{directory}: no weights (lit_model.pth or *.safetensors)")
    versions = []
    for p in files:
        st = p.stat()
        versions.append((str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return _files_sha(tuple(versions))


@functools.lru_cache(maxsize=64)
def _files_sha(files: tuple[tuple[str, int, int, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, *_version in files:
        path = Path(name)
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]
