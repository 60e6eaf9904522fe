"""Central storage: `models/` and `ref_data/` (reference names kept) in a local folder (the
default) or under an `s3://bucket/prefix` of any S3-compatible object store.

One class over an fsspec filesystem, with explicit operations: publish a package, read and
write metadata, list packages, and copy an artifact to local disk (verified, cached). Every
artifact is written whole (a renamed temporary file locally; an S3 PUT is atomic per object)
and the metadata is written last, so a reader never sees metadata that points at a half-copied
model. The metadata records each artifact's SHA-256: a reader from object storage verifies
what it downloaded (into a cache keyed by that digest), which also catches a `<model>.yaml`
package replaced between reading its metadata and its files.

S3 endpoint, region and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL`
for MinIO, Ceph or moto; `AWS_REGION`/`AWS_DEFAULT_REGION`; `AWS_ACCESS_KEY_ID`/...,
`AWS_PROFILE` or a role), as for every other AWS client.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import glob
import hashlib
import logging
import os
import posixpath
import re
import shutil
import threading
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict

from cvops.config import DriftDetectionConfig, InputSize

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

MODELS_DIR = "models"
REF_DATA_DIR = "ref_data"
RUN_ID_CHARS = 8  # run id prefix in versioned package names
SERVED_ARTIFACTS = ("model_path", "uae_model_path", "bbsd_model_path")  # a worker loads these
LOCATION_FIELD = "CENTRAL_STORAGE_PATH"
# S3 bucket naming rules (lower case, 3-63 characters, no leading/trailing dot or dash)
S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")


class StoragePathError(ValueError):
    """A name that would resolve outside central storage."""


class StorageError(RuntimeError):
    """Central storage cannot do what was asked (say which storage and why)."""


class ChecksumError(StorageError):
    """An artifact's bytes differ from the SHA-256 its metadata recorded."""


def parse_location(value: str | os.PathLike[str]) -> Path | str:
    """A local folder (Path) or a normalised `s3://bucket/prefix` URL (str, no trailing slash).

    ValueError, naming CENTRAL_STORAGE_PATH, for another scheme, a malformed bucket or prefix.
    """
    if isinstance(value, os.PathLike):
        return Path(value)
    text = str(value).strip()
    if "://" not in text:
        if not text:
            raise ValueError(f"{LOCATION_FIELD} is empty: a folder or s3://bucket/prefix")
        return Path(text)
    scheme = text.split("://", 1)[0].lower()
    if scheme not in ("s3", "s3a"):
        raise ValueError(
            f"{LOCATION_FIELD}={text!r}: {scheme}:// is not supported; "
            "use a local folder or s3://bucket/prefix"
        )
    text = "s3://" + text.split("://", 1)[1]
    match = S3_URL.match(text.rstrip("/"))
    if match is None:
        raise ValueError(
            f"{LOCATION_FIELD}={value!r}: expected s3://bucket/prefix with a valid bucket name "
            "(3-63 characters: lower-case letters, digits, '.', '-')"
        )
    prefix = match["prefix"] or ""
    parts = prefix.split("/") if prefix else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"{LOCATION_FIELD}={value!r}: the prefix may not hold empty, '.' or '..' segments"
        )
    return "/".join(["s3:/", match["bucket"], *parts])


def check_s3_credentials(url: str) -> None:
    """Fail early, naming the field, when no AWS credentials can be found for `url`.

    Looks everywhere botocore does except the EC2 instance metadata service (a network call
    to a link-local address, and a 1 s timeout per attempt off EC2). On EC2 with an instance
    profile, set AWS_EC2_METADATA_DISABLED=false to skip this check."""
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "false":
        return
    import botocore.credentials
    import botocore.session

    resolver = botocore.credentials.create_credential_resolver(botocore.session.Session())
    resolver.remove("iam-role")
    if resolver.load_credentials() is None:
        raise ValueError(
            f"{LOCATION_FIELD}={url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a web identity or container role; on EC2 "
            "with an instance profile AWS_EC2_METADATA_DISABLED=false)"
        )


def validated_location(value: Any) -> Path | str:
    """Settings validator for central storage: parse, and check credentials for S3."""
    location = parse_location(value)
    if isinstance(location, str):
        check_s3_credentials(location)
    return location


# The type of every central-storage setting: a local folder or an s3:// URL.
StorageLocation = Annotated[Path | str, BeforeValidator(validated_location)]


def location_text(location: str | os.PathLike[str]) -> str:
    """What to hand to another process or print: an absolute folder, or the s3:// URL."""
    parsed = parse_location(location)
    return str(parsed.resolve()) if isinstance(parsed, Path) else parsed


def join_location(location: str | os.PathLike[str], *parts: str) -> Path | str:
    """`location/part/...`, a Path for a local folder (resolved), a URL for object storage."""
    parsed = parse_location(location)
    if isinstance(parsed, Path):
        return parsed.resolve().joinpath(*parts)
    return "/".join([parsed, *parts])


def s3_endpoint() -> str | None:
    """The S3 endpoint of the standard AWS variables (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _s3_filesystem() -> AbstractFileSystem:
    """A fresh s3fs filesystem on the standard AWS variables. No listing cache: a reader that
    polls must see a publish as soon as its metadata object exists."""
    import s3fs

    client_kwargs = {
        key: value
        for key, value in (("endpoint_url", s3_endpoint()), ("region_name", s3_region()))
        if value
    }
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False
    )


class StorageSettings(Protocol):
    central_storage_path: Path | str
    state_dir: Path


def open_storage(settings: StorageSettings) -> CentralStorage:
    """Central storage of these settings, its download cache in their state folder."""
    return CentralStorage(
        settings.central_storage_path,
        cache_dir=Path(settings.state_dir) / "cache" / "central_storage",
    )


class ModelMetadata(BaseModel):
    """`<model_name>.yaml`: the config's `model` section (minus save_dir) plus provenance.

    Paths are relative to central storage so the same file works wherever storage is mounted.
    `sha256` holds each artifact's digest by its path field (empty in packages of earlier
    cvops: those load unverified).
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
    sha256: dict[str, str] = {}


class CentralStorage:
    """Central storage at `location` (a folder, or `s3://bucket/prefix`).

    Artifacts of object storage are read through local copies in `cache_dir`, keyed by their
    recorded SHA-256, so a model version is downloaded once per host."""

    def __init__(self, location: str | os.PathLike[str], cache_dir: Path | None = None) -> None:
        parsed = parse_location(location)
        self.remote = isinstance(parsed, str)
        self.root: Path | str
        if isinstance(parsed, str):
            self.root = self.url = parsed
            self.base = parsed.removeprefix("s3://")
            self.fs = _s3_filesystem()
        else:
            from fsspec.implementations.local import LocalFileSystem

            self.root = parsed.resolve()
            self.url = str(self.root)
            self.base = self.root.as_posix()
            self.fs = LocalFileSystem()
        state = Path(os.environ.get("CVOPS_STATE_DIR", ".cvops"))
        self.cache_dir = Path(cache_dir or state / "cache" / "central_storage").resolve()

    def __repr__(self) -> str:
        return f"CentralStorage({self.url!r})"

    # ------------------------------------------------------------------ paths

    def ensure_layout(self) -> None:
        if not self.remote:  # object storage has no folders
            for name in (MODELS_DIR, REF_DATA_DIR):
                (self._local_root / name).mkdir(parents=True, exist_ok=True)

    @property
    def _local_root(self) -> Path:
        if not isinstance(self.root, Path):
            raise StorageError(f"central storage {self.url} is not a local folder")
        return self.root

    def resolve(self, relative: str) -> Path:
        """A local path inside storage (local folders only); anything escaping it (.., an
        absolute path, a symlink out) is refused."""
        root = self._local_root
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise StoragePathError(f"{relative!r} is outside central storage {root}")
        return path

    def check_relative(self, relative: str) -> str:
        """`relative` normalised, or StoragePathError when it would leave storage."""
        if not self.remote:
            return self.resolve(relative).relative_to(self._local_root).as_posix()
        normal = posixpath.normpath(relative)
        if relative.startswith("/") or normal == ".." or normal.startswith("../"):
            raise StoragePathError(f"{relative!r} is outside central storage {self.url}")
        return normal

    def _path(self, relative: str) -> str:
        """The filesystem path (fsspec form) of `relative`."""
        return f"{self.base}/{self.check_relative(relative)}"

    def location_of(self, relative: str) -> str:
        """Where `relative` lives, for messages: a local path or an s3:// URL."""
        return f"{self.url}/{self.check_relative(relative)}"

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
        """The local path of a metadata file (local folders only; else `load_metadata`)."""
        return self.resolve(f"{MODELS_DIR}/{metadata_file}")

    # ------------------------------------------------------------------ primitives

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self._path(relative)))

    def read_bytes(self, relative: str) -> bytes:
        """The whole object in one GET (s3fs would HEAD it first to split large objects: not
        worth a request for metadata); FileNotFoundError when there is none."""
        if self.remote:
            return bytes(self.fs.cat_file(self._path(relative), max_concurrency=1))
        return bytes(self.fs.cat_file(self._path(relative)))

    def _list(self, relative: str) -> list[dict[str, Any]]:
        """Files directly under `relative` (fsspec info dicts); [] when there is nothing."""
        try:
            entries = self.fs.ls(self._path(relative), detail=True)
        except FileNotFoundError:
            return []
        return [e for e in entries if e.get("type") == "file"]

    def _write(self, relative: str, data: bytes | Path, *, create: bool = False) -> None:
        """One object, all or nothing. Locally a temporary file renamed into place, or with
        `create` hard-linked (never replaces: FileExistsError); on S3 one PUT, conditional
        (If-None-Match) with `create`."""
        if self.remote:
            path = self._path(relative)
            mode = "create" if create else "overwrite"
            if isinstance(data, Path):
                self.fs.put_file(str(data), path, mode=mode)
            else:
                self.fs.pipe_file(path, data, mode=mode)
            return
        target = self.resolve(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            if isinstance(data, Path):
                shutil.copy2(data, tmp)
            else:
                tmp.write_bytes(data)
            if create:
                os.link(tmp, target)
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def write_objects(self, objects: dict[str, bytes], *, fsync: bool = True) -> None:
        """Many small objects (replacing any of the same key); on return every one is stored.
        On S3 the PUTs run concurrently (one fsspec `pipe`), each durable once answered;
        locally each file is renamed into place complete and, with `fsync`, flushed to disk
        with its folders (survives power loss)."""
        if not objects:
            return
        if self.remote:
            self.fs.pipe({self._path(k): v for k, v in objects.items()})
            return
        folders: set[Path] = set()
        for relative, data in objects.items():
            target = self.resolve(relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    if fsync:
                        handle.flush()
                        os.fsync(handle.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            folders.update((target.parent, target.parent.parent))
        if fsync:
            for folder in folders:
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def sha256_of(self, relative: str) -> str:
        """SHA-256 of a stored object, streamed (no local copy)."""
        digest = hashlib.sha256()
        with self.fs.open(self._path(relative), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def local_copy(self, relative: str, sha256: str | None = None) -> Path:
        """A local file holding `relative`.

        A local folder's file itself, read in place as always (no copy, no check). From object
        storage a download into the cache: with the `sha256` its metadata recorded, the bytes
        are verified (ChecksumError) and a cached copy is reused without any request; without
        one (packages of earlier cvops) it is downloaded every time."""
        if not self.remote:
            return self.resolve(relative)
        normal = self.check_relative(relative)
        if sha256:
            target = self.cache_dir / "sha256" / sha256 / posixpath.basename(normal)
            if target.is_file():  # verified before it was renamed into place
                log.debug("Cache hit for %s: %s", self.location_of(normal), target)
                return target
        else:
            target = self.cache_dir / "unverified" / normal
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            self.fs.get_file(self._path(normal), str(tmp))
            if sha256:
                self._verify(tmp, sha256, normal)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("Downloaded %s to %s", self.location_of(normal), target)
        return target

    def _verify(self, path: Path, expected: str, relative: str) -> None:
        actual = file_sha256(path)
        if actual != expected:
            raise ChecksumError(
                f"{self.location_of(relative)} does not match its metadata (sha256 "
                f"{actual[:12]}..., recorded {expected[:12]}...): it changed after the metadata "
                "was read (a publish in between) or is corrupt"
            )

    # ------------------------------------------------------------------ metadata

    def load_metadata(self, metadata_file: str) -> ModelMetadata:
        """`models/<metadata_file>`; FileNotFoundError when there is none."""
        text = self.read_bytes(f"{MODELS_DIR}/{metadata_file}")
        return ModelMetadata.model_validate(yaml.safe_load(text))

    def has_metadata(self, metadata_file: str) -> bool:
        return self.exists(f"{MODELS_DIR}/{metadata_file}")

    def save_metadata(
        self, metadata_file: str, metadata: ModelMetadata, *, create: bool = False
    ) -> None:
        """Write `models/<metadata_file>` whole; `create`: never replace (FileExistsError)."""
        data = yaml.safe_dump(metadata.model_dump(mode="json"), sort_keys=False).encode()
        self._write(f"{MODELS_DIR}/{metadata_file}", data, create=create)

    def fetch(self, metadata_file: str, *keys: str) -> tuple[ModelMetadata, dict[str, Path]]:
        """The metadata and verified local copies of its artifacts `keys` (path fields).

        A publish that replaces the `<model>.yaml` package after its metadata was read shows
        as a checksum mismatch: the artifact then comes from the immutable versioned copy of
        the same run (written before the mutable files), or, for an unversioned package, the
        metadata is read once more; a mismatch after that is an error (a corrupt file)."""
        for attempt in (1, 2):
            meta = self.load_metadata(metadata_file)
            try:
                return meta, {key: self._artifact(meta, key) for key in keys}
            except ChecksumError as err:
                if attempt == 2:
                    raise
                log.info("Reading %s again: %s", metadata_file, err)
        raise AssertionError("unreachable")

    def _artifact(self, meta: ModelMetadata, key: str) -> Path:
        """Local copy of one artifact of `meta`; on a checksum mismatch, the same bytes from
        the versioned package of the same run when there is one."""
        digest = meta.sha256.get(key)
        try:
            return self.local_copy(getattr(meta, key), digest)
        except ChecksumError:
            if not (digest and meta.version and meta.mlflow_run_id):
                raise
            name = self.versioned_metadata_file(meta.model_name, meta.version, meta.mlflow_run_id)
            try:
                pinned = self.load_metadata(name)
            except FileNotFoundError:
                raise ChecksumError(f"{meta.model_name}: {key} changed, no {name}") from None
            if getattr(pinned, key) == getattr(meta, key) or pinned.sha256.get(key) != digest:
                raise
            log.info("%s changed under its metadata: reading it from %s", key, name)
            return self.local_copy(getattr(pinned, key), digest)

    def newest_metadata_file(self) -> str | None:
        """The most recently written `<model>.yaml` in models/ (start-up default). Object
        stores keep whole seconds: a tie goes to the greater name (`<model>.yaml`, written
        last by a publish, over its `<model>-v<tag>.yaml`)."""
        found = [
            (_modified(e), posixpath.basename(e["name"]))
            for e in self._list(MODELS_DIR)
            if e["name"].endswith(".yaml")
        ]
        return max(found)[1] if found else None

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
            try:
                meta = self.load_metadata(name)
            except FileNotFoundError:
                continue
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
            f"{model_name} v{version} of run {run_id} is not in central storage {self.url}{found}"
        )

    def versioned_packages(self, model_name: str) -> list[tuple[str, ModelMetadata]]:
        """(metadata file, metadata) of every readable versioned package of `model_name`."""
        pattern = f"{glob.escape(model_name)}-v*.yaml"
        names = sorted(
            name
            for name in (posixpath.basename(e["name"]) for e in self._list(MODELS_DIR))
            if fnmatch.fnmatchcase(name, pattern)
        )
        found = []
        for name in names:
            try:
                meta = self.load_metadata(name)
            except (OSError, ValueError, yaml.YAMLError) as err:
                log.warning("Skipping unreadable %s: %s", self.location_of(f"models/{name}"), err)
                continue
            if meta.model_name == model_name and meta.version is not None:
                found.append((name, meta))
        return found

    # ------------------------------------------------------------------ publishing

    def publish(self, files: dict[str, Path], metadata: ModelMetadata) -> PurePosixPath:
        """Copy packaged files in (each whole), then write the metadata file, with the files'
        SHA-256; returns its path relative to storage (`models/<name>.yaml`).

        `models/<name>.yaml` (the reference's name) always describes the latest package. A
        versioned model also gets an immutable copy under `models/versions/<name>/<tag>/`
        described by `models/<name>-v<tag>.yaml` (tag: version and run id prefix), so a
        rollback can serve exactly that model again. An existing versioned package is never
        overwritten: publishing the same files again is a no-op, anything else a
        PackageConflictError before any file is written.
        """
        self.ensure_layout()
        digests = {key: file_sha256(Path(source)) for key, source in files.items()}
        metadata = metadata.model_copy(update={"sha256": {**metadata.sha256, **digests}})
        if metadata.version:
            self._publish_version(files, metadata)
        for key, source in files.items():
            self._write(getattr(metadata, key), Path(source))
        name = f"{metadata.model_name}.yaml"
        self.save_metadata(name, metadata)
        log.info(
            "Published %s v%s (run %s) to central storage %s",
            metadata.model_name,
            metadata.version,
            metadata.mlflow_run_id,
            self.url,
        )
        return PurePosixPath(MODELS_DIR, name)

    def _publish_version(self, files: dict[str, Path], metadata: ModelMetadata) -> None:
        """The immutable copy: every artifact created only where none is (a stored one must
        hold the same bytes), then the metadata, also created only where none is. So two
        publishes under one name never overwrite each other's files."""
        assert metadata.version is not None
        tag = self.version_tag(metadata.version, metadata.mlflow_run_id)
        folder = f"{MODELS_DIR}/versions/{metadata.model_name}/{tag}"
        self.check_relative(folder)
        pinned = metadata.model_copy(
            update={key: f"{folder}/{Path(source).name}" for key, source in files.items()}
        )
        name = self.versioned_metadata_file(
            metadata.model_name, metadata.version, metadata.mlflow_run_id
        )
        try:
            self._check_same(name, files, metadata)
        except FileNotFoundError:
            pass
        else:
            log.info("%s is already in central storage: kept as it is", name)
            return
        # No metadata: files there are from an interrupted or concurrent publish
        leftovers = [
            key
            for key in files
            if self.exists(getattr(pinned, key))
            and self.sha256_of(getattr(pinned, key)) != metadata.sha256[key]
        ]
        if leftovers:
            raise self._folder_conflict(folder, name, metadata)
        for key, source in files.items():
            try:
                self._write(getattr(pinned, key), Path(source), create=True)
            except FileExistsError:
                if self.sha256_of(getattr(pinned, key)) != metadata.sha256[key]:
                    raise self._folder_conflict(folder, name, metadata) from None
        try:
            self.save_metadata(name, pinned, create=True)
        except FileExistsError:
            self._check_same(name, files, metadata)

    def _folder_conflict(
        self, folder: str, name: str, metadata: ModelMetadata
    ) -> PackageConflictError:
        return PackageConflictError(
            f"refusing to overwrite {folder} in central storage {self.url}: it holds other "
            f"files than v{metadata.version} of run {metadata.mlflow_run_id} and no {name} (an "
            "interrupted or concurrent publish); versioned packages are immutable"
        )

    def _check_same(self, name: str, files: dict[str, Path], metadata: ModelMetadata) -> None:
        """Raise PackageConflictError unless `name` describes the same run with byte-identical
        artifacts (a retried publish of the same package); FileNotFoundError without `name`."""
        existing = self.load_metadata(name)

        def stored(key: str) -> str | None:
            if key in existing.sha256:
                return existing.sha256[key]
            relative = getattr(existing, key)  # packages of earlier cvops record no digests
            return self.sha256_of(relative) if self.exists(relative) else None

        same = existing.mlflow_run_id == metadata.mlflow_run_id and all(
            stored(key) == metadata.sha256[key] for key in files
        )
        if not same:
            raise PackageConflictError(
                f"refusing to overwrite {name} in central storage {self.url}: it "
                f"holds {existing.model_name} v{existing.version} of MLflow run "
                f"{existing.mlflow_run_id}, the new package is v{metadata.version} of run "
                f"{metadata.mlflow_run_id} with other files; versioned packages are immutable "
                "(rollbacks serve them)"
            )


def _modified(info: dict[str, Any]) -> float:
    """Modification time of an fsspec info dict (local: mtime, S3: LastModified)."""
    if "mtime" in info:
        return float(info["mtime"])
    stamp = info.get("LastModified")
    return stamp.timestamp() if isinstance(stamp, dt.datetime) else 0.0


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


def write_metadata(path: Path, metadata: ModelMetadata) -> None:
    """A metadata file on local disk (a package being built, or a local central storage)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(metadata.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)


def read_metadata(path: Path) -> ModelMetadata:
    return ModelMetadata.model_validate(yaml.safe_load(Path(path).read_text()))


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
