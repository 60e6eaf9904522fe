"""Central storage on S3-compatible object storage, against a real S3 server process (moto).

Packages here are plain byte files (the storage layer does not care what they hold), except
where the service's `load_model` is measured, which needs a real (untrained) Keras package.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from cvops.config import InputSize
from cvops.settings import Settings
from cvops.storage import (
    CentralStorage,
    ChecksumError,
    ModelMetadata,
    PackageConflictError,
    PackageNotFoundError,
    parse_location,
)
from tests.s3 import S3Server

NAME = "shapes_s3"
KEYS = ("model_path", "uae_model_path", "bbsd_model_path", "reference_data_path")


def build(folder: Path, seed: int, size: int = 64 * 1024) -> dict[str, Path]:
    """Four artifact files whose bytes say which build they are."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, key in enumerate(KEYS):
        path = (
            folder / Path(CentralStorage.artifact_names(NAME, metadata().drift_detection)[key]).name
        )
        path.write_bytes(bytes([seed, i]) * (size // 2))
        files[key] = path
    return files


def metadata(version: str | None = "1", run_id: str | None = "a" * 32) -> ModelMetadata:
    from cvops.config import DriftDetectionConfig

    names = CentralStorage.artifact_names(NAME, DriftDetectionConfig())
    return ModelMetadata(
        model_name=NAME,
        input_size=InputSize(w=50, h=50),
        classes=["a", "b"],
        version=version,
        mlflow_run_id=run_id,
        **names,
    )


def test_locations_parse_and_bad_ones_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_location("central_storage") == Path("central_storage")
    assert parse_location("s3://my-bucket/a/b/") == "s3://my-bucket/a/b"
    assert parse_location("s3://my-bucket") == "s3://my-bucket"
    for bad, why in (
        ("s3://", "valid bucket"),
        ("s3://Bad_Bucket/x", "valid bucket"),
        ("s3://bucket/a//b", "empty"),
        ("s3://bucket/../b", "'..'"),
        ("gs://bucket/x", "not supported"),
    ):
        with pytest.raises(ValueError, match=why) as err:
            parse_location(bad)
        assert "CENTRAL_STORAGE_PATH" in str(err.value)
    monkeypatch.setenv("CENTRAL_STORAGE_PATH", "s3://")
    with pytest.raises(ValidationError, match="CENTRAL_STORAGE_PATH"):
        Settings()


def test_missing_credentials_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CENTRAL_STORAGE_PATH", "s3://bucket/prefix")
    with pytest.raises(ValidationError, match="no AWS credentials found") as err:
        Settings()
    assert "CENTRAL_STORAGE_PATH=s3://bucket/prefix" in str(err.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert Settings().central_storage_path == "s3://bucket/prefix"
    assert Settings().dvc_remote("ds") == "s3://bucket/prefix/dvc_remote/ds"
    assert Settings().mlflow_artifact_root == "s3://bucket/prefix/mlartifacts"


def test_publish_list_and_find_on_s3(s3_bucket: str, tmp_path: Path, s3_server: S3Server) -> None:
    url = f"s3://{s3_bucket}/team/central"
    storage = CentralStorage(url, cache_dir=tmp_path / "cache")
    assert storage.newest_metadata_file() is None and storage.versioned_packages(NAME) == []
    v1 = metadata("1", "a" * 32)
    assert str(storage.publish(build(tmp_path / "b1", 1), v1)) == f"models/{NAME}.yaml"
    storage.publish(build(tmp_path / "b2", 2), metadata("2", "b" * 32))

    meta = storage.load_metadata(f"{NAME}.yaml")
    assert meta.version == "2" and set(meta.sha256) == set(KEYS)
    assert storage.newest_metadata_file() == f"{NAME}.yaml"  # written last
    assert [name for name, _ in storage.versioned_packages(NAME)] == [
        f"{NAME}-v1-aaaaaaaa.yaml",
        f"{NAME}-v2-bbbbbbbb.yaml",
    ]
    first = storage.find_version(NAME, "1", "a" * 32)
    pinned, files = storage.fetch(first, *KEYS)
    assert pinned.model_path == f"models/versions/{NAME}/1-aaaaaaaa/{NAME}.keras"
    assert files["model_path"].read_bytes() == (tmp_path / "b1" / f"{NAME}.keras").read_bytes()
    with pytest.raises(PackageNotFoundError, match=f"{url}; central storage has"):
        storage.find_version(NAME, "1", "c" * 32)
    # the same package again is a no-op; another run under the same name is refused
    storage.publish(build(tmp_path / "b1", 1), v1)
    with pytest.raises(PackageConflictError, match="other files"):
        storage.publish(build(tmp_path / "b3", 3), v1)
    objects = {
        path.removeprefix(f"{s3_bucket}/team/central/")
        for path in storage.fs.find(f"{s3_bucket}/team/central")
    }
    assert f"models/{NAME}.keras" in objects and f"ref_data/{NAME}_ref_data.parquet" in objects
    assert not any(".tmp" in name for name in objects)


def test_a_reader_polling_during_publishes_never_sees_a_half_package(
    s3_bucket: str, tmp_path: Path
) -> None:
    """While packages are published (a first one, then two that replace `<model>.yaml`), a
    reader fetching `<model>.yaml` in a loop gets nothing or a whole package: every file it
    got has the bytes of the build its metadata names."""
    url = f"s3://{s3_bucket}/cs"
    builds = {run: build(tmp_path / run[:4], seed) for seed, run in enumerate("abc", 1)}
    builds = {run * 32: files for run, files in builds.items()}
    writer = CentralStorage(url, cache_dir=tmp_path / "writer-cache")
    reader = CentralStorage(url, cache_dir=tmp_path / "reader-cache")
    done, seen, errors = threading.Event(), [], []

    def poll() -> None:
        while not done.is_set():
            try:
                meta, files = reader.fetch(f"{NAME}.yaml", *KEYS)
            except FileNotFoundError:
                continue
            except Exception as err:  # noqa: BLE001 - any error fails the test
                errors.append(err)
                return
            built = builds[meta.mlflow_run_id]
            if any(files[k].read_bytes() != built[k].read_bytes() for k in KEYS):
                errors.append(AssertionError(f"mixed package for run {meta.mlflow_run_id}"))
            seen.append(meta.mlflow_run_id)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for i, (run, files) in enumerate(builds.items(), 1):
            writer.publish(files, metadata(str(i), run))
    finally:
        done.set()
        thread.join(60)
    assert not errors, errors
    assert seen and set(seen) <= set(builds), f"the reader saw {len(seen)} packages"
    assert reader.fetch(f"{NAME}.yaml", *KEYS)[0].mlflow_run_id == "c" * 32


def test_a_changed_object_is_a_checksum_error(s3_bucket: str, tmp_path: Path) -> None:
    storage = CentralStorage(f"s3://{s3_bucket}/cs", cache_dir=tmp_path / "cache")
    storage.publish(build(tmp_path / "b", 1), metadata(None, None))  # unversioned: no copy
    storage.fs.pipe_file(f"{s3_bucket}/cs/models/{NAME}_uae.keras", b"not the model")
    with pytest.raises(ChecksumError, match=f"s3://{s3_bucket}/cs/models/{NAME}_uae.keras"):
        storage.fetch(f"{NAME}.yaml", *KEYS)
    assert not list((tmp_path / "cache").rglob(f"{NAME}_uae.keras"))  # nothing bad cached


def test_a_changed_mutable_file_is_read_from_the_versioned_copy(
    s3_bucket: str, tmp_path: Path
) -> None:
    """`<model>.keras` replaced under a reader that holds the old `<model>.yaml`: the bytes
    come from the immutable copy of the same run."""
    storage = CentralStorage(f"s3://{s3_bucket}/cs", cache_dir=tmp_path / "cache")
    files = build(tmp_path / "b", 1)
    storage.publish(files, metadata("1", "a" * 32))
    storage.fs.pipe_file(f"{s3_bucket}/cs/models/{NAME}.keras", b"the next model")
    _, got = storage.fetch(f"{NAME}.yaml", *KEYS)
    assert got["model_path"].read_bytes() == files["model_path"].read_bytes()


def test_model_load_downloads_once_per_version(
    s3_bucket: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """The service's load: metadata and three models from S3 on a cold cache, then the
    metadata alone (the models come from the cache, keyed by their SHA-256)."""
    from cvops.service.model_store import ModelLoadError, load_model
    from tests.service.conftest import package

    local = tmp_path / "local"
    metadata_file = package(local, NAME, "1", seed=1, run_id="d" * 32)
    url = f"s3://{s3_bucket}/cs"
    meta = CentralStorage(local).load_metadata(metadata_file)
    built = local / "_build" / NAME / f"1-{'d' * 32}"
    CentralStorage(url).publish({k: built / Path(getattr(meta, k)).name for k in KEYS}, meta)

    storage = CentralStorage(url, cache_dir=tmp_path / "cache")
    mark = s3_server.mark()
    first = load_model(storage, metadata_file)
    cold = s3_server.requests(s3_bucket, mark)
    mark = s3_server.mark()
    second = load_model(storage, metadata_file)
    warm = s3_server.requests(s3_bucket, mark)
    print(f"\nrequests per model load: cold {len(cold)} {cold}, warm {len(warm)} {warm}")
    assert first.run_id == second.run_id == "d" * 32
    assert [m for m, _ in cold] == ["GET"] * 4 and len({p for _, p in cold}) == 4
    assert warm == [("GET", f"/{s3_bucket}/cs/models/{metadata_file}")]

    with pytest.raises(ModelLoadError) as missing:
        load_model(storage, "nothing.yaml")
    assert missing.value.status == 404
    storage.fs.pipe_file(f"{s3_bucket}/cs/models/versions/{NAME}/1-dddddddd/{NAME}.keras", b"x")
    with pytest.raises(ModelLoadError, match="does not match its metadata") as corrupt:
        load_model(CentralStorage(url, cache_dir=tmp_path / "new"), f"{NAME}-v1-dddddddd.yaml")
    assert corrupt.value.status == 422


def test_scheduled_monitor_runs_get_the_bucket_but_no_credentials(s3_bucket: str) -> None:
    """Job variables are shown in Prefect's UI: where the bucket is, never the keys (the
    worker's environment has those)."""
    from cvops import deploy

    url = f"s3://{s3_bucket}/cs"
    env = deploy.monitor_env(Settings(central_storage_path=url))
    assert env["CENTRAL_STORAGE_PATH"] == url
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert "AWS_ENDPOINT_URL" not in deploy.monitor_env(Settings(central_storage_path="cs"))
