"""The model state in the prediction database (cvops.service.replicas): replicas that start
later, lapsed heartbeats, a desired model a replica cannot load, concurrent publishes, and the
database going away."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cvops.records.schema import make_engine, upgrade_schema
from cvops.service import state as state_module
from cvops.service.app import create_app
from cvops.service.replicas import ModelState, ReplicaReport
from cvops.service.settings import ServiceSettings
from tests.pg import PostgresCluster, wait_until
from tests.service.conftest import free_port, image_bytes

AUTH = {"Authorization": "Bearer s3cret"}


def replica_settings(storage_root: Path, tmp: Path, host: str, **extra: object) -> ServiceSettings:
    values: dict[str, object] = {
        "central_storage_path": storage_root,
        "state_dir": tmp / host,
        "db_url": f"sqlite:///{tmp / 'shared.db'}",
        "replica_host": host,
        "metadata_file": "shapes_a.yaml",
        "admin_token": "s3cret",
        "reload_poll_s": 0.1,
        "heartbeat_s": 0.2,
        # several replicas share this test process, and each model swap pauses all of it for
        # one full garbage collection (`settle_heap`: ~0.4 s here, more under CI load)
        "heartbeat_lapse_s": 3.0,
        "update_wait_s": 20.0,
        **extra,
    }
    return ServiceSettings(**values)  # type: ignore[arg-type]


@contextmanager
def replica(settings: ServiceSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def version(client: TestClient) -> str:
    answer = client.post("/predict", files={"file": ("x.png", image_bytes())})
    assert answer.status_code == 200, answer.text
    return answer.json()["model_version"]


def test_a_later_replica_comes_up_on_the_desired_model(storage_root: Path, tmp_path: Path):
    with replica(replica_settings(storage_root, tmp_path, "host-a")) as a:
        put = a.put("/update_model/shapes_b.yaml", headers=AUTH)
        assert put.status_code == 200, put.text
        assert put.json()["replicas"] == [a.get("/health_check").json()["replica"]]
        # B is told shapes_a at start, but the deployment serves shapes_b now
        with replica(replica_settings(storage_root, tmp_path, "host-b")) as b:
            health = b.get("/ready").json()
            assert (health["model_version"], health["generation"]) == ("7", 2)
            assert version(b) == "7"
            again = a.put("/update_model/shapes_a.yaml", headers=AUTH).json()
            assert again["workers"] == 2 and again["workers_pending"] == []
            assert {r.split(":")[0] for r in again["replicas"]} == {"host-a", "host-b"}
            assert version(b) == "1"


def test_a_lapsed_heartbeat_stops_counting(storage_root: Path, tmp_path: Path):
    settings = replica_settings(storage_root, tmp_path, "host-a")
    with replica(settings) as a:
        ghost = ModelState(make_engine(settings.resolved_db_url), "default", "ghost", pid=1)
        ghost.report(ReplicaReport(generation=0))  # then silent, like a killed process
        started = time.monotonic()
        body = a.put("/update_model/shapes_b.yaml", headers=AUTH).json()
        waited = time.monotonic() - started
        # waited for the ghost until its heartbeat lapsed, then no longer counted it
        assert 0.5 < waited < 10, waited
        assert body["workers"] == 1 and body["workers_pending"] == []
        assert all(not r.startswith("ghost:") for r in body["replicas"])
        ghost.engine.dispose()


def test_a_replica_that_does_not_follow_in_time_is_named(storage_root: Path, tmp_path: Path):
    settings = replica_settings(storage_root, tmp_path, "host-a", update_wait_s=0.5)
    settings = settings.model_copy(update={"heartbeat_lapse_s": 30.0})
    with replica(settings) as a:
        ghost = ModelState(make_engine(settings.resolved_db_url), "default", "ghost", pid=1)
        ghost.report(ReplicaReport(generation=0))
        body = a.put("/update_model/shapes_b.yaml", headers=AUTH).json()
        assert body["workers"] == 2
        assert body["replicas_pending"] == ["ghost:1"] and body["workers_pending"] == [1]
        ghost.engine.dispose()


def test_an_unloadable_desired_model_makes_a_replica_unready(
    storage_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    storage = tmp_path / "storage"
    shutil.copytree(storage_root, storage, ignore=shutil.ignore_patterns("_build"))
    monkeypatch.setattr(state_module, "LOAD_RETRY_S", 0.5)
    settings = replica_settings(storage, tmp_path, "host-a")
    with replica(settings) as a:
        assert a.get("/ready").status_code == 200
        engine = make_engine(settings.resolved_db_url)
        other = ModelState(engine, "default", "host-b", pid=2)
        other.publish("late_model.yaml")  # as another host's PUT would, before it is there
        assert wait_until(lambda: a.get("/ready").status_code == 503, timeout=20)
        detail = a.get("/ready").json()["detail"]
        assert "cannot load the desired model late_model.yaml" in detail
        assert "still serving shapes_a.yaml" in detail
        assert version(a) == "1"  # still answers with its old model
        rows = {r.id: r for r in other.live(5.0)}
        mine = rows[a.get("/health_check").json()["replica"]]
        assert not mine.ok and "late_model.yaml" in (mine.detail or "")
        # once the model can be loaded, the replica retries on its own and is ready again
        shutil.copy(storage / "models" / "shapes_b.yaml", storage / "models" / "late_model.yaml")
        assert wait_until(lambda: a.get("/ready").status_code == 200, timeout=30)
        assert version(a) == "7"
        assert {r.id: r for r in other.live(5.0)}[mine.id].ok
        # and a later generation is followed as usual
        other.publish("shapes_a.yaml")
        assert wait_until(lambda: a.get("/health_check").json()["model_version"] == "1", 30)
        engine.dispose()


def test_startup_with_the_database_down_still_serves(storage_root: Path, tmp_path: Path):
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    settings = replica_settings(storage_root, tmp_path, "host-a", db_url=unreachable)
    with replica(settings) as a:
        assert a.get("/ready").status_code == 200
        assert version(a) == "1"
        put = a.put("/update_model/shapes_b.yaml", headers=AUTH)
        assert put.status_code == 503
        assert "model state database is unreachable" in put.json()["detail"]
        assert version(a) == "1"  # nothing changed


def test_concurrent_publishes_get_distinct_generations(postgres: PostgresCluster) -> None:
    url = postgres.create_database("state")
    engine = make_engine(url)
    upgrade_schema(engine)
    engine.dispose()

    def publish(i: int) -> list[int]:
        own = make_engine(url)
        try:
            state = ModelState(own, "default", f"host-{i}", pid=i)
            return [state.publish(f"m{i}.yaml").generation for _ in range(5)]
        finally:
            own.dispose()

    with ThreadPoolExecutor(8) as pool:
        generations = [g for batch in pool.map(publish, range(8)) for g in batch]
    assert sorted(generations) == list(range(1, 41))


def test_database_outage_keeps_serving_and_refuses_swaps(
    storage_root: Path, tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.create_database("outage")
    settings = replica_settings(storage_root, tmp_path, "host-a", db_url=url)
    with replica(settings) as a:
        me = a.get("/health_check").json()["replica"]
        engine = make_engine(url)
        state = ModelState(engine, "default", "probe")
        assert [r.id for r in state.live(1.0)] == [me]
        engine.dispose()
        postgres.stop()
        try:
            assert a.get("/ready").status_code == 200
            assert version(a) == "1"
            put = a.put("/update_model/shapes_b.yaml", headers=AUTH)
            assert put.status_code == 503, put.text
            assert "unreachable" in put.json()["detail"]
        finally:
            postgres.start()
        time.sleep(1.5)  # longer than the lapse: only a resumed heartbeat counts now
        engine = make_engine(url)
        probe = ModelState(engine, "default", "probe")
        assert wait_until(lambda: [r.id for r in probe.live(1.0)] == [me], timeout=20)
        engine.dispose()
        assert a.put("/update_model/shapes_b.yaml", headers=AUTH).status_code == 200
        assert version(a) == "7"
