"""Request logging that loses nothing: local durable spool first, database when it answers.

Each worker appends records to its own SQLite spool file (fsync'd, off the request path); a
flusher thread moves them to the prediction DB in batches with `ON CONFLICT DO NOTHING`, so a
batch re-sent after an outage lands exactly once. If the database is down or slow the service
keeps answering; records wait in the spool and are written when it is back. Spool files left by
a dead worker are adopted by the next flusher that can lock them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from tenacity import Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

from cvops.service.db import ApiLog, Feedback, Prediction, make_engine, upgrade_schema

log = logging.getLogger(__name__)

TABLES: dict[str, Table] = {
    "prediction": Prediction.__table__,  # type: ignore[dict-item]
    "api_log": ApiLog.__table__,  # type: ignore[dict-item]
    "feedback": Feedback.__table__,  # type: ignore[dict-item]
}
DATETIME_FIELDS = ("created_on",)


class Spool:
    """An append-only local queue in one SQLite file, locked by its owner process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock_file = open(path.with_suffix(".lock"), "a+")  # noqa: SIM115 - held for life
        fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " kind TEXT NOT NULL, payload TEXT NOT NULL)"
        )
        self._mutex = threading.Lock()

    @classmethod
    def adopt(cls, path: Path) -> Spool | None:
        """Take over another process's spool if that process is gone (its lock is free)."""
        try:
            return cls(path)
        except BlockingIOError:
            return None

    def put(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        """Append records in one fsync'd transaction, in order (parents before children)."""
        rows = [(kind, json.dumps(payload, default=str)) for kind, payload in records]
        with self._mutex:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO spool (kind, payload) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def take(self, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT seq, kind, payload FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(seq, kind, json.loads(payload)) for seq, kind, payload in rows]

    def delete_upto(self, seq: int) -> None:
        with self._mutex:
            self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))

    def pending(self) -> int:
        with self._mutex:
            return int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def close(self, remove_if_empty: bool = True) -> None:
        empty = self.pending() == 0
        self._db.close()
        if remove_if_empty and empty:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.path.with_suffix(".lock").unlink(missing_ok=True)
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


def _row(payload: dict[str, Any]) -> dict[str, Any]:
    row = dict(payload)
    for name in DATETIME_FIELDS:
        if isinstance(row.get(name), str):
            row[name] = dt.datetime.fromisoformat(row[name])
    return row


def write_batch(engine: Engine, records: list[tuple[str, dict[str, Any]]]) -> None:
    """Insert a batch in one transaction; rows already there are skipped (exactly once)."""
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    with engine.begin() as conn:
        for kind in ("prediction", "api_log", "feedback"):  # parents first (api_log -> predictions)
            rows = [_row(p) for k, p in records if k == kind]
            if rows:
                conn.execute(insert(TABLES[kind]).on_conflict_do_nothing(), rows)


class Recorder:
    """Owns this worker's spool and the flusher thread."""

    def __init__(
        self, db_url: str, spool_dir: Path, *, batch_size: int = 200, interval_s: float = 0.5
    ) -> None:
        self.engine = make_engine(db_url)
        self.spool_dir = spool_dir
        self.spool = Spool(spool_dir / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.db")
        self.batch_size = batch_size
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-flusher", daemon=True)
        self._schema_ready = False
        self.db_available = False

    def record(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        self.spool.put(records)
        self._wake.set()

    def pending(self) -> int:
        return self.spool.pending()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        try:
            self._flush_spool(self.spool)
        except SQLAlchemyError as err:
            log.warning(
                "DB unavailable at shutdown (%s): %d records stay spooled in %s",
                type(err).__name__,
                self.spool.pending(),
                self.spool.path,
            )
        self.spool.close()
        self.engine.dispose()

    def _flush_spool(self, spool: Spool) -> int:
        if not self._schema_ready:
            upgrade_schema(self.engine)
            self._schema_ready = True
        moved = 0
        while batch := spool.take(self.batch_size):
            write_batch(self.engine, [(kind, payload) for _, kind, payload in batch])
            spool.delete_upto(batch[-1][0])
            moved += len(batch)
        return moved

    def _orphans(self) -> list[Spool]:
        mine = self.spool.path
        adopted = []
        for path in sorted(self.spool_dir.glob("spool-*.db")):
            if path != mine and (spool := Spool.adopt(path)) is not None:
                adopted.append(spool)
        return adopted

    def _flush_all(self) -> None:
        self._flush_spool(self.spool)
        for orphan in self._orphans():
            try:
                moved = self._flush_spool(orphan)
                if moved:
                    log.info("Wrote %d records left by a stopped worker (%s)", moved, orphan.path)
            finally:
                orphan.close()

    def _run(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(SQLAlchemyError),
            wait=wait_exponential(multiplier=0.5, max=10),
            stop=stop_when_event_set(self._stop),
            sleep=self._stop.wait,
            before_sleep=self._log_outage,
            reraise=False,
        )
        while not self._stop.is_set():
            try:
                retrying(self._flush_all)
            except Exception:  # never let the flusher die; the records stay spooled
                log.exception("flusher error")
            if not self.db_available and not self._stop.is_set():
                log.info("Prediction DB reachable; spool drained")
            self.db_available = True
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _log_outage(self, state: Any) -> None:
        if self.db_available or state.attempt_number == 1:
            log.warning(
                "Prediction DB unavailable (%s); %d records spooled on disk, retrying",
                type(state.outcome.exception()).__name__,
                self.spool.pending(),
            )
        self.db_available = False
