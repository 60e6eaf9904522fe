"""One model version across hosts: three `cvops serve` processes, each with its own state folder
and host name (three "hosts"), sharing only Postgres and an S3 server, behind one nginx
upstream. Under continuous load a `PUT /update_model` through nginx reaches every replica with
no failed request; a replica killed in the middle of the next swap stops counting and nginx
sends its requests elsewhere; a replica started afterwards comes up on the deployment's model."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from cvops.service.nginx import write_config
from cvops.storage import CentralStorage, read_metadata
from tests.nginx_helpers import free_port, running
from tests.pg import PostgresCluster
from tests.s3 import S3Server, s3_bucket, s3_server  # noqa: F401 - fixtures
from tests.service.conftest import ServiceProcess, image_bytes, live_replicas
from tests.service.test_nginx import nginx_binary, prefix  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

AUTH = {"Authorization": "Bearer s3cret"}
FAST_STATE = {  # heartbeats fast enough that a dead replica stops counting within seconds
    "CVOPS_SERVICE_HEARTBEAT_S": "0.5",
    "CVOPS_SERVICE_HEARTBEAT_LAPSE_S": "2",
}


def to_s3(storage_root: Path, url: str, name: str, cache: Path) -> None:
    """Publish a locally built package again into object storage (no training)."""
    meta = read_metadata(storage_root / "models" / f"{name}.yaml")
    names = CentralStorage.artifact_names(name, meta.drift_detection)
    files = {key: storage_root / getattr(meta, key) for key in names}
    CentralStorage(url, cache_dir=cache).publish(files, meta.model_copy(update={"sha256": {}}))


class Load:
    """Threads posting images through nginx; every answer as (sent, status, version, replied)."""

    def __init__(self, base: str, threads: int = 4) -> None:
        self.base = base
        self.records: list[tuple[float, int, str | None, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        payload = image_bytes()
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post("/predict?heatmaps=false", files={"file": ("x.png", payload)})
                except httpx.HTTPError as err:
                    self.errors.append(repr(err))
                    continue
                version = r.json().get("model_version") if r.status_code == 200 else None
                self.records.append((sent, r.status_code, version, time.monotonic()))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def check(self, returned: float, version: str) -> None:
        """No failed request; every one sent after `returned` answered by `version`."""
        assert not self.errors, self.errors[:5]
        failed = [r for r in self.records if r[1] != 200]
        assert not failed, failed[:5]
        after = [r for r in self.records if r[0] > returned]
        assert len(after) > 10, len(after)
        assert {r[2] for r in after} == {version}


def test_one_model_version_across_three_hosts(
    storage_root: Path,
    tmp_path: Path,
    s3_bucket: str,  # noqa: F811
    postgres: PostgresCluster,
    nginx_binary: str,  # noqa: F811
    prefix: Path,  # noqa: F811
) -> None:
    url = f"s3://{s3_bucket}/central"
    for name in ("shapes_a", "shapes_b"):
        to_s3(storage_root, url, name, tmp_path / "publisher-cache")
    db_url = postgres.create_database("records")

    def host(i: int, model: str) -> ServiceProcess:
        folder = tmp_path / f"host-{i}"
        folder.mkdir()
        return ServiceProcess(
            url,  # type: ignore[arg-type]
            folder,
            workers=1,
            model=model,
            CVOPS_SERVICE_DB_URL=db_url,
            CVOPS_SERVICE_REPLICA_HOST=f"host-{i}",
            **FAST_STATE,
        )

    with ExitStack() as stack:
        hosts = [stack.enter_context(host(i, "shapes_a.yaml")) for i in range(3)]
        assert {r.host for r in live_replicas(db_url)} == {"host-0", "host-1", "host-2"}
        port = free_port()
        config = write_config(
            prefix,
            {
                "NGINX_PORT": str(port),
                "SERVICE_UPSTREAM": ",".join(f"127.0.0.1:{h.port}" for h in hosts),
                "NGINX_WORKER_PROCESSES": "1",
            },
            env={},
            nginx=nginx_binary,
        )
        site = config.conf.parent.joinpath("default.conf").read_text()
        assert site.count("server 127.0.0.1:") == 3
        assert "proxy_next_upstream error timeout non_idempotent;" in site
        base = stack.enter_context(running(config, port))

        # 1. a swap under load, through nginx
        with Load(base) as load:
            time.sleep(3)
            put_sent = time.monotonic()
            put = httpx.put(f"{base}/update_model/shapes_b.yaml", headers=AUTH, timeout=120)
            returned = time.monotonic()
            time.sleep(3)
        assert put.status_code == 200, put.text
        body = put.json()
        log.info("swap under load: PUT took %.2f s: %s", returned - put_sent, body)
        assert body["workers"] == 3 and body["workers_pending"] == [], body
        assert not body["workers_failed"]
        assert {r.split(":")[0] for r in body["replicas"]} == {"host-0", "host-1", "host-2"}
        load.check(returned, "7")
        assert {r[2] for r in load.records if r[3] < put_sent} == {"1"}

        # 2. the next swap, with host-2 killed (SIGKILL, its whole process group) in the middle
        dead = hosts[2]
        dead_ids = {r.id for r in live_replicas(db_url, host="host-2")}
        answer: dict[str, httpx.Response] = {}

        def swap() -> None:
            answer["put"] = httpx.put(
                f"{base}/update_model/shapes_a.yaml", headers=AUTH, timeout=120
            )

        with Load(base) as load:
            time.sleep(2)
            putter = threading.Thread(target=swap)
            putter.start()
            time.sleep(0.2)  # the receiving replica is loading the model
            os.killpg(dead.proc.pid, signal.SIGKILL)
            in_flight = "put" not in answer
            dead.proc.wait(30)
            putter.join(120)
            returned = time.monotonic()
            time.sleep(3)
        put = answer["put"]
        assert in_flight, "the PUT returned before the kill: not a kill in the middle of a swap"
        assert put.status_code == 200, put.text
        body = put.json()
        log.info("swap with a replica killed: %s", body)
        # the dead one is either dropped after its heartbeat lapsed or named as pending
        assert set(body["replicas_pending"]) <= dead_ids, body
        alive = {r for r in body["replicas"] if r not in dead_ids}
        assert {r.split(":")[0] for r in alive} == {"host-0", "host-1"}, body
        load.check(returned, "1")
        for h in hosts[:2]:
            assert httpx.get(f"{h.base}/health_check", timeout=10).json()["model_version"] == "1"

        # 3. a replica started afterwards, told another model, serves the deployment's
        late = stack.enter_context(host(3, "shapes_b.yaml"))
        health = httpx.get(f"{late.base}/ready", timeout=10).json()
        assert health["model_version"] == "1" and health["metadata_file"] == "shapes_a.yaml"
        time.sleep(2.5)  # past the lapse: the killed replica no longer counts
        assert {r.host for r in live_replicas(db_url, lapse_s=2)} == {
            "host-0",
            "host-1",
            "host-3",
        }
