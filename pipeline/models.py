"""Resolving the model and tokenizer references of a manifest to local directories."""

from __future__ import annotations

from pathlib import Path

from pipeline import assets
from pipeline.errors import SipError
from pipeline.manifest import Manifest


class ModelNotFound(SipError, ValueError):
    pass


def resolve_model_dir(manifest: Manifest, ref: str, key: str) -> Path:
    """``embedded`` or a local directory; anything else is an error naming ``key``.

    A hub id (``org/name``) is never downloaded: clusters without internet need the same
    behaviour as laptops with it, so models always come from local paths.
    """
    if ref == "embedded":
        return assets.embedded_model()
    path = manifest.resolve_path(ref)
    if path.is_dir():
        return path
    hint = ""
    if "/" in ref and not ref.startswith((".", "/", "~")) and ref.count("/") == 1:
        hint = " It looks like a hub id; this project never downloads models: download it once and give its local path."
    raise ModelNotFound(f"{key}: '{ref}' is not a local directory ({path}).{hint} Allowed: 'embedded' or a path.")


def policy_tokenizer_dir(manifest: Manifest) -> Path:
    if manifest.policy.tokenizer is not None:
        return resolve_model_dir(manifest, manifest.policy.tokenizer, "policy.tokenizer")
    return resolve_model_dir(manifest, manifest.policy.model, "policy.model")


def model_fingerprint(directory: Path) -> str:
    """Cheap identity of a model directory: its config plus the names and sizes of its files.

    Hashing multi-GB weights on every run would cost minutes; config + file sizes changes
    whenever the weights are replaced by a different checkpoint in practice.
    """
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file():
            continue
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        if path.suffix in (".json", ".yaml") and path.stat().st_size < 1_000_000:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
