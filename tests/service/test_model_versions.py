"""Versioned packages from several MLflow registries share one central storage: none is lost,
none is overwritten, and a rollback serves exactly the registry's model (by run id)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from mlflow.tracking import MlflowClient

from cvops import deploy
from cvops.service.app import create_app
from cvops.service.model_store import load_model
from cvops.service.settings import ServiceSettings
from cvops.storage import CentralStorage, PackageConflictError, read_metadata, write_metadata
from tests.service.conftest import free_port, image_bytes, package

NAME = "shapes_v"


def registry(folder: Path) -> MlflowClient:
    """A separate MLflow registry (its own SQLite store), as a second stack would have."""
    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(NAME)
    return client


def train_and_publish(client: MlflowClient, root: Path, seed: int) -> tuple[str, str]:
    """A run, its registry version and its package in central storage: (version, run id)."""
    run = client.create_run("0")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(NAME, source=str(root), run_id=run.info.run_id)
    package(root, NAME, str(version.version), seed=seed, run_id=run.info.run_id)
    return str(version.version), run.info.run_id


def versioned_packages(root: Path) -> dict[tuple[str, str | None], str]:
    """(version, run id) -> metadata file of every versioned package in central storage."""
    found: dict[tuple[str, str | None], str] = {}
    for path in sorted((root / "models").glob(f"{NAME}-v*.yaml")):
        meta = read_metadata(path)
        found[(str(meta.version), meta.mlflow_run_id)] = path.name
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def running_service(settings: ServiceSettings) -> Iterator[str]:
    """The service app on 127.0.0.1 in a thread (real HTTP for `deploy.rollback`)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "service did not start"
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def test_two_registries_one_central_storage_lose_no_version(tmp_path: Path) -> None:
    root = tmp_path / "central_storage"
    stack_a, stack_b = registry(tmp_path / "a"), registry(tmp_path / "b")
    a1 = train_and_publish(stack_a, root, seed=1)
    a2 = train_and_publish(stack_a, root, seed=2)
    deploy.promote(stack_a, NAME, a1[0])
    deploy.promote(stack_a, NAME, a2[0])
    b1 = train_and_publish(stack_b, root, seed=3)  # a fresh registry: "version 1" again
    assert a1[0] == b1[0] == "1" and a1[1] != b1[1]

    packages = versioned_packages(root)
    assert {a1, a2, b1} <= packages.keys(), f"lost a package: {sorted(packages)}"
    storage = CentralStorage(root)
    for (version, run_id), metadata_file in packages.items():
        loaded = load_model(storage, metadata_file)
        assert (loaded.version, loaded.metadata.mlflow_run_id) == (version, run_id)
        built = root / "_build" / NAME / f"{version}-{run_id}" / f"{NAME}.keras"
        assert sha256(storage.resolve(loaded.metadata.model_path)) == sha256(built)
    # the reference's un-versioned name still describes the latest package
    assert read_metadata(root / "models" / f"{NAME}.yaml").mlflow_run_id == b1[1]

    settings = ServiceSettings(
        central_storage_path=root,
        state_dir=tmp_path / "state",
        metadata_file=packages[a2],
        admin_token="s3cret",
        batch_max_wait_ms=2,
    )
    with running_service(settings) as base:
        before = httpx.get(f"{base}/health_check", timeout=10).json()
        assert (before["model_version"], before["mlflow_run_id"]) == a2
        summary = deploy.rollback(
            stack_a, root, NAME, url=base, token="s3cret", set_variables=False
        )
        assert a1[1] in summary and packages[a1] in summary
        health = httpx.get(f"{base}/health_check", timeout=10).json()
        assert (health["model_version"], health["mlflow_run_id"]) == a1
        assert health["metadata_file"] == packages[a1]
        answer = httpx.post(
            f"{base}/predict", files={"file": ("x.png", image_bytes(), "image/png")}, timeout=60
        )
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    assert deploy.champion_version(stack_a, NAME) == a1[0]


def test_a_versioned_package_is_never_overwritten(tmp_path: Path) -> None:
    """Same name (run ids sharing the 8-character prefix), other files: refused, naming both
    runs, before any file changes; the same files again are a no-op."""
    root = tmp_path / "central_storage"
    first, clash = "abcdef12" + "0" * 24, "abcdef12" + "1" * 24
    package(root, NAME, "1", seed=1, run_id=first)
    pinned = root / "models" / f"{NAME}-v1-abcdef12.yaml"
    assert pinned.is_file()
    files = sorted(p for p in (root / "models").rglob("*") if p.is_file())
    before = {p: sha256(p) for p in files}

    storage = CentralStorage(root)
    current = read_metadata(root / "models" / f"{NAME}.yaml")
    build = root / "_build" / NAME / f"1-{first}"
    names = CentralStorage.artifact_names(NAME, current.drift_detection)
    storage.publish({key: build / Path(rel).name for key, rel in names.items()}, current)

    with pytest.raises(PackageConflictError) as refused:
        package(root, NAME, "1", seed=2, run_id=clash)  # another registry's v1, same prefix
    assert first in str(refused.value) and clash in str(refused.value)
    with pytest.raises(PackageConflictError, match="other files"):
        package(root, NAME, "1", seed=3, run_id=first)  # same run, different files
    after = sorted(p for p in (root / "models").rglob("*") if p.is_file())
    assert after == files and {p: sha256(p) for p in after} == before


def test_packages_of_earlier_cvops_still_load_and_roll_back(tmp_path: Path) -> None:
    """`<model>-v<version>.yaml` (earlier cvops) is found by its run id; a registry whose
    version is not in central storage gets an error naming what is there instead."""
    root = tmp_path / "central_storage"
    stack = registry(tmp_path / "a")
    v1 = train_and_publish(stack, root, seed=1)
    v2 = train_and_publish(stack, root, seed=2)
    deploy.promote(stack, NAME, v1[0])
    deploy.promote(stack, NAME, v2[0])
    storage = CentralStorage(root)
    new_name = CentralStorage.versioned_metadata_file(NAME, *v1)
    meta = read_metadata(root / "models" / new_name)  # rewritten the way earlier cvops laid out
    old_folder = root / "models" / "versions" / NAME / "1"
    (root / "models" / "versions" / NAME / f"1-{v1[1][:8]}").rename(old_folder)
    legacy = meta.model_copy(
        update={
            key: f"models/versions/{NAME}/1/{Path(getattr(meta, key)).name}"
            for key in ("model_path", "uae_model_path", "bbsd_model_path", "reference_data_path")
        }
    )
    write_metadata(root / "models" / f"{NAME}-v1.yaml", legacy)
    (root / "models" / new_name).unlink()

    loaded = load_model(storage, f"{NAME}-v1.yaml")
    assert (loaded.version, loaded.run_id) == v1
    summary = deploy.rollback(stack, root, NAME, url=None, token=None, set_variables=False)
    assert f"{NAME}-v1.yaml" in summary and v1[1] in summary

    other = registry(tmp_path / "c")  # its v1 and v2 were never published here
    for _ in range(2):
        run = other.create_run("0")
        other.create_model_version(NAME, source=str(root), run_id=run.info.run_id)
    deploy.promote(other, NAME, "1")
    deploy.promote(other, NAME, "2")
    with pytest.raises(RuntimeError, match="not in central storage") as missing:
        deploy.rollback(other, root, NAME, url=None, token=None, set_variables=False)
    assert f"{NAME}-v1.yaml (run {v1[1]})" in str(missing.value)
    assert deploy.champion_version(other, NAME) == "2"  # nothing changed


def test_deploy_pins_the_versioned_package_behind_the_mutable_name(tmp_path: Path) -> None:
    """`<model>.yaml` is rewritten by every publish; the deploy step serves (and names in the
    Prefect Variable) the immutable package it described at deploy time."""
    from cvops.flows.deploy_flow import pinned_metadata_file

    storage = CentralStorage(tmp_path)
    package(tmp_path, "pinned", "1", seed=1, run_id="a" * 32)
    first = read_metadata(storage.metadata_path("pinned.yaml"))
    assert pinned_metadata_file(storage, "pinned.yaml", first) == f"pinned-v1-{'a' * 8}.yaml"
    package(tmp_path, "pinned", "1", seed=2, run_id="b" * 32)  # another registry's v1
    second = read_metadata(storage.metadata_path("pinned.yaml"))
    assert pinned_metadata_file(storage, "pinned.yaml", second) == f"pinned-v1-{'b' * 8}.yaml"
    # what the first deploy pinned still loads the first run's model
    assert load_model(storage, f"pinned-v1-{'a' * 8}.yaml").run_id == "a" * 32
    package(tmp_path, "unversioned", None, seed=3)
    plain = read_metadata(storage.metadata_path("unversioned.yaml"))
    assert pinned_metadata_file(storage, "unversioned.yaml", plain) == "unversioned.yaml"
