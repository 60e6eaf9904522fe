"""`cvops spool drain`: an operator moves a spool left on a dead host's disk into the prediction
DB, exactly once however often it is run; a spool a live process holds is left alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import text
from typer.testing import CliRunner

from cvops.cli import app
from cvops.records.schema import make_engine
from cvops.service.recording import Spool
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
