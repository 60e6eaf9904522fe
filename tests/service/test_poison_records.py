"""One record the database refuses cannot stop logging: the batch is split, the bad record goes
to the dead-letter table with its reason, every other record flows (real Postgres 15)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from cvops.records.schema import ApiLog
from cvops.service.recording import Recorder
from tests.pg import PostgresCluster, wait_until


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


def rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine("postgresql+psycopg://" + url.removeprefix("postgresql://"))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def prediction_ids(url: str) -> set[str]:
    try:
        return {r[0] for r in rows(url, "SELECT id FROM predictions")}
    except ProgrammingError:  # the flusher has not created the tables yet
        return set()


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def prediction(i: int) -> tuple[str, dict]:
    return (
        "prediction",
        {
            "id": str(uuid.uuid4()),
            "model_name": "m",
            "model_version": "1",
            "input_img": None,
            "raw_hm_img": None,
            "overlaid_img": None,
            "prediction_json": {"prediction": {"a": 1.0}, "predicted_class": "a"},
            "uae_feats": [float(i)] * 4,
            "bbsd_feats": [1.0],
            "hidden_feats": None,
            "created_on": now(),
        },
    )


def api_log(method: str, url: str, prediction_id: str | None = None) -> tuple[str, dict]:
    return (
        "api_log",
        {
            "id": str(uuid.uuid4()),
            "method": method,
            "url": url,
            "status": 404,
            "message": None,
            "timespan": 0.01,
            "created_on": now(),
            "prediction_id": prediction_id,
        },
    )


def test_storable_is_lossless_where_it_can_be() -> None:
    from cvops.service.recording import storable

    table = ApiLog.__table__
    row = storable(table, {"method": "UNSUBSCRIBE", "url": "/x\x00y", "message": "a\x00"})
    assert row["method"] == "UNSUBSCRIBE"  # the column is wide enough now
    assert row["url"] == "/x%00y"  # NUL percent-encoded in a URL: reversible
    assert "\x00" not in row["message"]
    long = storable(table, {"method": "X" * 500})
    assert len(long["method"]) <= table.c.method.type.length


def test_records_postgres_refuses_do_not_block_later_ones(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    url = postgres.create_database("poison")
    recorder = Recorder(url, tmp_path / "spool", interval_s=0.05)
    recorder.start()
    try:
        before = [prediction(i) for i in range(3)]
        recorder.record(before)
        # the two requests from outside testing, as the middleware records them
        recorder.record([api_log("GET", "/x\x00")])
        recorder.record([api_log("UNSUBSCRIBE", "/predict")])
        # a record no cleaning can make storable: a dangling foreign key
        dangling = api_log("POST", "/predict", prediction_id=str(uuid.uuid4()))
        recorder.record([dangling])
        after = [prediction(i) for i in range(40)]
        for record in after:
            recorder.record([record, api_log("POST", "/predict", record[1]["id"])])
        expected = {p["id"] for _, p in before + after}
        assert wait_until(lambda: prediction_ids(url) == expected, 30), (
            "later predictions did not reach Postgres"
        )
        assert wait_until(lambda: recorder.pending() == 0, 10)
    finally:
        recorder.stop()

    logged = dict(rows(url, "SELECT method, url FROM api_log WHERE status = 404"))
    assert logged["UNSUBSCRIBE"] == "/predict"
    assert logged["GET"] == "/x%00"
    dead = rows(url, "SELECT kind, record_id, reason, payload FROM dead_letters")
    assert [(kind, record_id) for kind, record_id, _, _ in dead] == [("api_log", dangling[1]["id"])]
    assert "foreign key" in dead[0][2].lower()
    assert json.loads(dead[0][3])["prediction_id"] == dangling[1]["prediction_id"]
    assert recorder.dead_letters == 1


def test_dead_letter_falls_back_to_a_file_when_the_db_refuses_it_too(tmp_path: Path) -> None:
    """The dead-letter table is gone (a damaged schema): the refused record lands in a file."""
    db = tmp_path / "service.db"
    recorder = Recorder(f"sqlite:///{db}", tmp_path / "spool", interval_s=0.05)
    recorder.start()
    try:
        recorder.record([prediction(0)])
        assert wait_until(lambda: recorder.pending() == 0, 10)
        with recorder.engine.begin() as conn:
            conn.execute(text("DROP TABLE dead_letters"))
        bad = api_log("GET", "/a")
        bad[1]["status"] = None  # NOT NULL: no database takes it
        good = prediction(1)
        recorder.record([bad, good])
        assert wait_until(lambda: recorder.pending() == 0, 10)
    finally:
        recorder.stop()
    path = tmp_path / "spool" / "dead_letters.jsonl"
    (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert entry["kind"] == "api_log" and entry["record"]["id"] == bad[1]["id"]
    assert "NOT NULL" in entry["reason"]
    assert path.stat().st_mode & 0o077 == 0
    with create_engine(f"sqlite:///{db}").connect() as conn:
        ids = {r[0] for r in conn.execute(text("SELECT id FROM predictions"))}
    assert good[1]["id"] in ids


def test_spool_and_service_db_are_private(tmp_path: Path) -> None:
    """The spool holds uploaded images and service.db the predictions: owner-only, like the
    rest of the state (they were 0644)."""
    spool_dir = tmp_path / "service" / "spool"
    recorder = Recorder(f"sqlite:///{tmp_path / 'service' / 'service.db'}", spool_dir)
    recorder.start()
    try:
        recorder.record([prediction(0)])
        assert wait_until(lambda: recorder.pending() == 0, 10)
        recorder.record([prediction(1)])  # a spool with a -wal file
        files = [tmp_path / "service" / "service.db", *spool_dir.iterdir()]
        assert any(f.name.endswith("-wal") for f in files)
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
        assert set(modes.values()) == {"0o600"}, modes
        assert spool_dir.stat().st_mode & 0o777 == 0o700
        # FAST (2), not this SQLite's default ON: zeroing every freed overflow page wrote each
        # record's ~40 KB of images a second time; the file stays private (above)
        assert recorder.spool._db.execute("PRAGMA secure_delete").fetchone()[0] == 2
    finally:
        recorder.stop()
