"""Service fixtures: packaged models in a temporary central storage, and an app client."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import keras
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from cvops.config import DriftDetectionConfig, InputSize
from cvops.model.build import build_model
from cvops.model.drift import build_bbsd, build_uae, reference_frame
from cvops.model.train import save_package
from cvops.records.schema import make_engine
from cvops.service.app import create_app
from cvops.service.replicas import ModelState, ReplicaRow
from cvops.service.settings import ServiceSettings
from cvops.storage import CentralStorage, ModelMetadata, utc_now
from tests.pg import PostgresCluster

CLASSES = ["circle", "square", "triangle"]


def package(
    storage_root: Path,
    name: str,
    version: str | None,
    seed: int,
    size: int = 50,
    hidden_layer: str | None = "features",
    run_id: str | None = None,
) -> str:
    """An untrained but complete package (model, UAE, BBSD, reference data, metadata);
    version None: not in the model registry (the deploy step then sets no alias);
    hidden_layer None: a model whose hidden features are not monitored; run_id: the MLflow
    run that registered it (its files are built under `_build/<name>/<version>-<run_id>`)."""
    keras.utils.set_random_seed(seed)
    model = build_model((size, size), len(CLASSES))
    uae, bbsd = build_uae((size, size), 32, seed=seed), build_bbsd(model)
    x = np.random.default_rng(seed).random((8, size, size, 3), dtype=np.float32)
    ref = reference_frame(uae(x).numpy(), bbsd(x).numpy(), np.arange(8) % 3, CLASSES)
    drift = DriftDetectionConfig(hidden_layer=hidden_layer)
    names = CentralStorage.artifact_names(name, drift)
    build = storage_root / "_build" / name / "-".join(filter(None, (version or "none", run_id)))
    files = save_package(build, name, names, model, uae, bbsd, ref)
    meta = ModelMetadata(
        model_name=name,
        input_size=InputSize(w=size, h=size),
        classes=CLASSES,
        drift_detection=drift,
        version=version,
        mlflow_run_id=run_id,
        created_on=utc_now(),
        **names,
    )
    return CentralStorage(storage_root).publish(files, meta).name


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("central_storage")
    package(root, "shapes_a", "1", seed=1)
    package(root, "shapes_b", "7", seed=2, size=40)
    return root


@pytest.fixture()
def settings(storage_root: Path, tmp_path: Path) -> ServiceSettings:
    return ServiceSettings(
        central_storage_path=storage_root,
        state_dir=tmp_path / "state",
        metadata_file="shapes_a.yaml",
        admin_token="s3cret",
        batch_max_wait_ms=2,
    )


@pytest.fixture()
def client(settings: ServiceSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`cvops serve` in a subprocess (real gunicorn workers), stopped with its whole group."""

    def __init__(
        self,
        storage_root: Path,
        tmp: Path,
        workers: int = 2,
        model: str | None = "shapes_a.yaml",
        **env: str,
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.db_url = env.get("CVOPS_SERVICE_DB_URL") or (
            f"sqlite:///{tmp / 'state' / 'service' / 'service.db'}"
        )
        self.host = env.get("CVOPS_SERVICE_REPLICA_HOST") or socket.gethostname()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "serve.log"
        self.env = {
            **os.environ,
            "CENTRAL_STORAGE_PATH": str(storage_root),
            "CVOPS_STATE_DIR": str(tmp / "state"),
            "CVOPS_SERVICE_ADMIN_TOKEN": "s3cret",
            **env,
        }
        self.cmd = [
            sys.executable,
            "-m",
            "cvops.cli",
            "serve",
            "--workers",
            str(workers),
            "--port",
            str(self.port),
            *(["--model", model] if model else []),
        ]
        # Without a model the service is alive but not ready: wait for liveness only.
        self.wait_path = "/ready" if model else "/health_check"

    def __enter__(self) -> ServiceProcess:
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answered = httpx.get(f"{self.base}{self.wait_path}", timeout=1).status_code == 200
            except httpx.HTTPError:
                answered = False
            # one worker answering is not all of them: wait until each has registered, so
            # tests that count workers (PUT /update_model) do not race a worker still booting
            if answered and len(self.replicas()) >= self.workers:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("service did not start:\n" + self.log_path.read_text()[-3000:])

    def replicas(self) -> list[ReplicaRow]:
        """This service's live replicas (worker processes) as its database records them."""
        return live_replicas(self.db_url, host=self.host)

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # a test killed it already
            self._log.close()
            return
        try:
            # gunicorn gives a busy worker its graceful_timeout (30 s) before killing it, and
            # then exits itself: waiting exactly 30 s raced that on busy cores
            self.proc.wait(45)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        finally:
            self._log.close()


def live_replicas(
    db_url: str, host: str | None = None, deployment: str = "default", lapse_s: float = 6.0
) -> list[ReplicaRow]:
    """Live replica rows of a deployment (of one host when given); none before the schema."""
    engine = make_engine(db_url)
    try:
        rows = ModelState(engine, deployment, "test").live(lapse_s)
    except SQLAlchemyError:
        return []
    finally:
        engine.dispose()
    return [row for row in rows if host is None or row.host == host]


@pytest.fixture()
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL 15 cluster, started; removed after the test."""
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.destroy()
