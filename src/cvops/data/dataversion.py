"""Which data a run trained on: the DVC tag + hash, checked out unattended when needed."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from cvops.config import DatasetConfig
from cvops.data.images import IMAGE_SUFFIXES
from cvops.data.versioning import current_version, ensure_version

log = logging.getLogger(__name__)


def is_dvc_repo(path: Path) -> bool:
    return (path / ".dvc").is_dir()


def fingerprint(path: Path) -> str:
    """Cheap content identity of a plain (non-DVC) image folder: names and sizes."""
    digest = hashlib.md5()
    for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        digest.update(f"{file.relative_to(path).as_posix()}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()


def resolve_data_version(ds: DatasetConfig) -> dict[str, Any]:
    """Bring the dataset to the configured tag (or warn, if checkout is off) and describe it."""
    path = ds.path
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset folder {path} does not exist (dataset.ds_root / dataset.ds_name); "
            "create the demo with `cvops data demo-repo`"
        )
    if is_dvc_repo(path):
        if ds.dvc_tag:
            version = ensure_version(path, ds.dvc_tag, checkout=ds.dvc_checkout)
        else:
            version = current_version(path)
        return {"source": "dvc", **version.as_dict()}
    if ds.dvc_tag:
        log.warning("%s is not a DVC repo: dvc_tag %s cannot be checked", path, ds.dvc_tag)
    return {"source": "folder", "tag": None, "dvc_hash": None, "fingerprint": fingerprint(path)}
