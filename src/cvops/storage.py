"""Central storage: the shared folder holding `models/` and `ref_data/` (reference names kept).

Artifacts are copied in atomically and the metadata YAML is written last, so a reader (the
model service) never sees metadata that points at a half-copied model.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from cvops.config import DriftDetectionConfig, InputSize

log = logging.getLogger(__name__)

MODELS_DIR = "models"
REF_DATA_DIR = "ref_data"
RUN_ID_CHARS = 8  # run id prefix in versioned package names


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
    backbone: str = "reference_cnn"  # packages from before backbones were configurable
    weights: str = "none"
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
    def version_tag(version: str, run_id: str | None) -> str:
        """`<version>-<run id prefix>`: registry versions restart at 1 in every registry, run ids
        do not, so packages of two registries sharing this storage never get the same name.
        Without a run id (packages not made by a training run) the bare version, as before."""
        short = re.sub(r"[^A-Za-z0-9]", "", run_id or "")[:RUN_ID_CHARS]
        return f"{version}-{short}" if short else str(version)

    @classmethod
    def versioned_metadata_file(
        cls, model_name: str, version: str, run_id: str | None = None
    ) -> str:
        """`<model>-v<version>-<run id prefix>.yaml`, the immutable package of one version."""
        return f"{model_name}-v{cls.version_tag(version, run_id)}.yaml"

    def find_version(self, model_name: str, version: str, run_id: str | None) -> str:
        """The metadata file of registry version `version` made by run `run_id`.

        Checks the recorded identity, not only the name: a legacy `<model>-v<version>.yaml`
        (earlier cvops) may hold another registry's version of the same number."""
        names = [self.versioned_metadata_file(model_name, version, run_id)]
        names.append(self.versioned_metadata_file(model_name, version))  # earlier cvops
        for name in dict.fromkeys(names):
            path = self.metadata_path(name)
            if path.is_file():
                meta = read_metadata(path)
                same = (meta.model_name, str(meta.version)) == (model_name, str(version))
                if same and meta.mlflow_run_id == run_id:
                    return name
        others = sorted(
            f"{name} (run {meta.mlflow_run_id})"
            for name, meta in self.versioned_packages(model_name)
            if str(meta.version) == str(version)
        )
        found = f"; central storage has {', '.join(others)}" if others else ""
        raise PackageNotFoundError(
            f"{model_name} v{version} of run {run_id} is not in central storage {self.root}{found}"
        )

    def versioned_packages(self, model_name: str) -> list[tuple[str, ModelMetadata]]:
        """(metadata file, metadata) of every readable versioned package of `model_name`."""
        found = []
        for path in sorted((self.root / MODELS_DIR).glob(f"{glob.escape(model_name)}-v*.yaml")):
            try:
                meta = read_metadata(path)
            except (OSError, ValueError, yaml.YAMLError) as err:
                log.warning("Skipping unreadable %s: %s", path, err)
                continue
            if meta.model_name == model_name and meta.version is not None:
                found.append((path.name, meta))
        return found

    def publish(self, files: dict[str, Path], metadata: ModelMetadata) -> Path:
        """Copy packaged files in (atomic renames), then write the metadata file.

        `models/<name>.yaml` (the reference's name) always describes the latest package. A
        versioned model also gets an immutable copy under `models/versions/<name>/<tag>/`
        described by `models/<name>-v<tag>.yaml` (tag: version and run id prefix), so a
        rollback can serve exactly that model again. An existing versioned package is never
        overwritten: publishing the same files again is a no-op, anything else a
        PackageConflictError before any file is written.
        """
        self.ensure_layout()
        if metadata.version:
            self._publish_version(files, metadata)
        for key, source in files.items():
            _atomic_copy(source, self.resolve(getattr(metadata, key)))
        meta_path = self.metadata_path(f"{metadata.model_name}.yaml")
        write_metadata(meta_path, metadata)
        log.info(
            "Published %s v%s (run %s) to central storage %s",
            metadata.model_name,
            metadata.version,
            metadata.mlflow_run_id,
            self.root,
        )
        return meta_path

    def _publish_version(self, files: dict[str, Path], metadata: ModelMetadata) -> None:
        """The immutable copy: artifacts staged in a private folder that is renamed into place
        (a rename never replaces a non-empty folder), then the metadata, linked (never
        replacing a file). So two publishes under one name cannot mix or overwrite files."""
        assert metadata.version is not None
        tag = self.version_tag(metadata.version, metadata.mlflow_run_id)
        folder = self.resolve(f"{MODELS_DIR}/versions/{metadata.model_name}/{tag}")
        relative = folder.relative_to(self.root).as_posix()
        pinned = metadata.model_copy(
            update={key: f"{relative}/{Path(source).name}" for key, source in files.items()}
        )
        name = self.versioned_metadata_file(
            metadata.model_name, metadata.version, metadata.mlflow_run_id
        )
        meta_path = self.metadata_path(name)
        if meta_path.is_file():
            self._check_same(meta_path, files, metadata)
            log.info("%s is already in central storage: kept as it is", name)
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{tag}.tmp-", dir=folder.parent))
        try:
            for source in files.values():
                shutil.copy2(source, staging / Path(source).name)
            try:
                os.rename(staging, folder)
            except OSError:  # the folder exists: same files (an interrupted publish) or refuse
                if not all(_same_file(folder / Path(s).name, s) for s in files.values()):
                    raise PackageConflictError(
                        f"refusing to overwrite {relative} in central storage {self.root}: it "
                        f"holds other files than v{metadata.version} of run "
                        f"{metadata.mlflow_run_id} and no {name} (an interrupted or concurrent "
                        "publish); versioned packages are immutable"
                    ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            write_metadata_once(meta_path, pinned)
        except FileExistsError:
            self._check_same(meta_path, files, metadata)

    def _check_same(self, meta_path: Path, files: dict[str, Path], metadata: ModelMetadata) -> None:
        """Raise PackageConflictError unless `meta_path` describes the same run with
        byte-identical artifacts (a retried publish of the same package)."""
        existing = read_metadata(meta_path)
        same = existing.mlflow_run_id == metadata.mlflow_run_id and all(
            _same_file(self.resolve(getattr(existing, key)), source)
            for key, source in files.items()
        )
        if not same:
            raise PackageConflictError(
                f"refusing to overwrite {meta_path.name} in central storage {self.root}: it "
                f"holds {existing.model_name} v{existing.version} of MLflow run "
                f"{existing.mlflow_run_id}, the new package is v{metadata.version} of run "
                f"{metadata.mlflow_run_id} with other files; versioned packages are immutable "
                "(rollbacks serve them)"
            )


class PackageConflictError(RuntimeError):
    """A versioned package would overwrite another one under the same name."""


class PackageNotFoundError(RuntimeError):
    """No versioned package in central storage has the wanted version and run id."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_file(target: Path, source: Path) -> bool:
    return target.is_file() and file_sha256(target) == file_sha256(source)


def write_metadata_once(path: Path, metadata: ModelMetadata) -> None:
    """Like write_metadata, but never replaces a file (os.link fails on an existing target):
    FileExistsError when another publish wrote `path` meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(metadata.model_dump(mode="json"), sort_keys=False))
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
