"""Central storage: the shared folder holding `models/` and `ref_data/` (reference names kept).

Artifacts are copied in atomically and the metadata YAML is written last, so a reader (the
model service) never sees metadata that points at a half-copied model.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from cvops.config import DriftDetectionConfig, InputSize

log = logging.getLogger(__name__)

MODELS_DIR = "models"
REF_DATA_DIR = "ref_data"


class StoragePathError(ValueError):
    """A name that would resolve outside central storage."""


class ModelMetadata(BaseModel):
    """`<model_name>.yaml`: the config's `model` section (minus save_dir) plus provenance.

    Paths are relative to central storage so the same file works wherever storage is mounted.
    """

    model_config = ConfigDict(extra="allow")

    model_name: str
    input_size: InputSize
    classes: list[str]
    classifier_activation: str = "softmax"
    classifier_type: str = "multi-class"
    classification_layer: str = "classify_head"
    drift_detection: DriftDetectionConfig = DriftDetectionConfig()
    model_path: str
    uae_model_path: str
    bbsd_model_path: str
    reference_data_path: str
    version: str | None = None
    data_version: dict[str, Any] = {}
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = {}
    created_on: str = ""


class CentralStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def ensure_layout(self) -> None:
        for name in (MODELS_DIR, REF_DATA_DIR):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def resolve(self, relative: str) -> Path:
        """A path inside storage; anything escaping it (.., absolute) is refused."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise StoragePathError(f"{relative!r} is outside central storage {self.root}")
        return path

    @staticmethod
    def artifact_names(model_name: str, drift: DriftDetectionConfig) -> dict[str, str]:
        """Relative paths of one packaged model, following the reference's naming."""
        return {
            "model_path": f"{MODELS_DIR}/{model_name}.keras",
            "uae_model_path": f"{MODELS_DIR}/{model_name}{drift.uae_model_suffix}.keras",
            "bbsd_model_path": f"{MODELS_DIR}/{model_name}{drift.bbsd_model_suffix}.keras",
            "reference_data_path": (
                f"{REF_DATA_DIR}/{model_name}{drift.reference_data_suffix}.parquet"
            ),
        }

    def metadata_path(self, metadata_file: str) -> Path:
        return self.resolve(f"{MODELS_DIR}/{metadata_file}")

    def newest_metadata_file(self) -> str | None:
        """The most recently written `<model>.yaml` in models/ (start-up default)."""
        candidates = sorted(
            (self.root / MODELS_DIR).glob("*.yaml"), key=lambda p: p.stat().st_mtime, reverse=True
        )
        return candidates[0].name if candidates else None

    @staticmethod
    def versioned_metadata_file(model_name: str, version: str) -> str:
        return f"{model_name}-v{version}.yaml"

    def publish(self, files: dict[str, Path], metadata: ModelMetadata) -> Path:
        """Copy packaged files in (atomic renames), then write the metadata file.

        `models/<name>.yaml` (the reference's name) always describes the latest package. A
        versioned model also gets an immutable copy under `models/versions/<name>/<version>/`
        described by `models/<name>-v<version>.yaml`, so a rollback can serve it again.
        """
        self.ensure_layout()
        if metadata.version:
            folder = f"{MODELS_DIR}/versions/{metadata.model_name}/{metadata.version}"
            pinned = metadata.model_copy(
                update={key: f"{folder}/{Path(source).name}" for key, source in files.items()}
            )
            for key, source in files.items():
                _atomic_copy(source, self.resolve(getattr(pinned, key)))
            name = self.versioned_metadata_file(metadata.model_name, metadata.version)
            write_metadata(self.metadata_path(name), pinned)
        for key, source in files.items():
            _atomic_copy(source, self.resolve(getattr(metadata, key)))
        meta_path = self.metadata_path(f"{metadata.model_name}.yaml")
        write_metadata(meta_path, metadata)
        log.info(
            "Published %s v%s to central storage %s",
            metadata.model_name,
            metadata.version,
            self.root,
        )
        return meta_path


def _atomic_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)


def write_metadata(path: Path, metadata: ModelMetadata) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(metadata.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)


def read_metadata(path: Path) -> ModelMetadata:
    return ModelMetadata.model_validate(yaml.safe_load(Path(path).read_text()))


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
