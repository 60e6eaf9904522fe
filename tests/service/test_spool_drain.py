"""`cvops spool drain`: an operator moves a spool left on a dead host's disk into the prediction
DB, exactly once however often it is run; a spool a live process holds is left alone."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from sqlalchemy import text
from typer.testing import CliRunner

from cvops.cli import app
from cvops.records.schema import make_engine
from cvops.service.recording import Recorder, Spool
from tests.pg import PostgresCluster
from tests.service.test_poison_records import api_log, prediction


def counts(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return tuple(  # type: ignore[return-value]
                conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
                for table in ("predictions", "api_log")
            )
    finally:
        engine.dispose()


def dead_host_spool(folder: Path, records: list[tuple[str, dict]]) -> Path:
    """A spool as a worker leaves it when its host dies: records in, lock released."""
    spool = Spool(folder / "spool-4242-deadbeef.db")
    spool.put(records)
    spool.close(remove_if_empty=False)
    return spool.path


def drain(*args: str) -> str:
    result = CliRunner().invoke(app, ["spool", "drain", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_drain_lands_every_record_once(tmp_path: Path, postgres: PostgresCluster) -> None:
    url = postgres.create_database("records")
    records = []
    for i in range(5):
        kind, row = prediction(i)
        records += [(kind, row), api_log("POST", "/predict", row["id"])]
    path = dead_host_spool(tmp_path / "host-b" / "spool", records)
    copy = tmp_path / "copy.db"
    shutil.copy(path, copy)  # the same records, as if sent again

    assert "10 records written" in drain(str(path.parent), "--db-url", url)
    assert counts(url) == (5, 5)
    assert not path.exists()  # an emptied spool is removed
    assert "10 records written" in drain(str(copy), "--db-url", url)
    assert counts(url) == (5, 5)


def test_a_spool_held_by_a_running_process_is_skipped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'records.db'}"
    held = Spool(tmp_path / "spool" / "spool-1-live.db")
    held.put([prediction(0)])
    try:
        output = drain(str(held.path), "--db-url", url)
        assert "skipped" in output and "0 records written" in output
        assert held.pending() == 1
    finally:
        held.close()


def test_spool_written_by_json_drains_and_its_predictions_are_found(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    """Spools are written by orjson now (compact: no spaces after separators); a spool an
    older version left (`json.dumps`) still drains, and `/feedback`'s lookup of a prediction
    that is only spooled finds ids in both spellings, and matches no id as a pattern."""
    url = postgres.create_database("records")
    folder = tmp_path / "spool"
    older_records = [prediction(i) for i in range(3)]
    older = Spool(folder / "spool-4242-deadbeef.db")
    older._db.executemany(
        "INSERT INTO spool (kind, payload) VALUES (?, ?)",
        [(kind, json.dumps(row, default=str)) for kind, row in older_records],
    )
    older.close(remove_if_empty=False)
    recorder = Recorder(url, folder)  # the flusher is not started: nothing drains meanwhile
    try:
        kind, row = prediction(7)
        recorder.record([(kind, row)])
        assert '"id":"' in recorder.spool._db.execute("SELECT payload FROM spool").fetchone()[0]
        assert recorder._in_spools(row["id"])
        assert recorder._in_spools(older_records[1][1]["id"])
        assert not recorder._in_spools(str(uuid.uuid4()))
        assert not recorder._in_spools("%")
        assert recorder.spool.take(10)[0][2] == row  # read back equal
    finally:
        recorder.stop()  # writes its own record
    assert "3 records written" in drain(str(older.path), "--db-url", url)
    assert counts(url)[0] == 4
