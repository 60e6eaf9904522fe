"""Request logging that loses nothing: local durable spool first, database when it answers.

Each worker appends records to its own SQLite spool file before the request is answered (so a
200 survives the worker being killed; concurrent requests share one fsync'd transaction); a
flusher thread moves them to the prediction DB in batches with `ON CONFLICT DO NOTHING`, so a
batch re-sent after an outage lands exactly once. If the database is down or slow the service
keeps answering; records wait in the spool and are written when it is back. Spool files left by
a dead worker are adopted by the next flusher that can lock them.

Image properties (`cvops.data.properties`, for the monitor's drift causes) are computed here,
off the request path: a request hands its model input to `Recorder.keep_input` (a reference,
no copy or work), and the flusher measures it as it moves the prediction to the database. Held
inputs are bounded in memory; a prediction whose input was not held (a long database outage,
a spool adopted from a dead worker) is stored without properties.

With `CVOPS_SERVICE_STORE_IMAGES=central_storage` the flusher also moves each prediction's
images out of its record into central storage (`cvops.records.images`: keys, layout)
before writing the row that references them. A storage outage is retried like a database
outage: the batch stays spooled, nothing is written until its images are stored, and a batch
re-read after a crash rewrites the same objects (keys come from the prediction id).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

from cvops.data.properties import input_properties
from cvops.records.images import ImageStoreUnavailable, stored_objects
from cvops.records.schema import (
    ApiLog,
    DeadLetter,
    Feedback,
    Prediction,
    make_engine,
    private_file,
    upgrade_schema,
)
from cvops.storage import CentralStorage, StoragePathError

log = logging.getLogger(__name__)
Records = list[tuple[str, dict[str, Any]]]  # (kind, payload) pairs, in order (parents first)

TABLES: dict[str, Table] = {
    "prediction": Prediction.__table__,  # type: ignore[dict-item]
    "api_log": ApiLog.__table__,  # type: ignore[dict-item]
    "feedback": Feedback.__table__,  # type: ignore[dict-item]
}
DATETIME_FIELDS = ("created_on",)
URL_FIELDS = ("url",)
DEAD_LETTER_FILE = "dead_letters.jsonl"
ORPHAN_SCAN_S = 5.0  # how often a flusher looks for spools left by a stopped worker
# SQLSTATE classes worth retrying the same batch for: connection exception, transaction
# rollback (deadlock, serialization), insufficient resources, operator intervention (shutdown),
# system error. Anything else is about the records themselves.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# SQLite's counterparts: locked or busy, I/O, disk full, cannot open
TRANSIENT_SQLITE_ERRORS = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
    "SQLITE_NOMEM",
)


def db_unreachable(err: BaseException) -> bool:
    """True when the same batch can succeed later (database down, restarting, busy);
    False when the database refused the records themselves."""
    if isinstance(err, (DisconnectionError, PoolTimeout)):
        return True
    if not isinstance(err, DBAPIError):
        return False  # a value that cannot even be bound, a bad timestamp, ...
    if err.connection_invalidated:
        return True
    sqlstate = getattr(err.orig, "sqlstate", None)
    if sqlstate:
        return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
    sqlite_error = getattr(err.orig, "sqlite_errorname", None)
    if sqlite_error:
        return sqlite_error.startswith(TRANSIENT_SQLITE_ERRORS)
    # no SQLSTATE: a client-side failure of the driver (connection refused, lost)
    return isinstance(err, (OperationalError, InterfaceError))


def refusal_reason(err: BaseException) -> str:
    """The database's own message, one line, without the SQL and its parameters (images)."""
    detail = str(err.orig) if isinstance(err, DBAPIError) else f"{type(err).__name__}: {err}"
    first = detail.strip().splitlines()[0] if detail.strip() else type(err).__name__
    return first.replace("\x00", "")[:500]


def storable(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """Values made storable without losing meaning: Postgres text cannot hold NUL, so a NUL
    in a URL is percent-encoded (as it came over the wire) and dropped elsewhere; a string
    longer than its column is cut to fit (ids never are: they are ours)."""
    out = dict(row)
    for name, value in row.items():
        if not isinstance(value, str) or name not in table.c:
            continue
        if "\x00" in value:
            value = value.replace("\x00", "%00" if name in URL_FIELDS else "")
        length = getattr(table.c[name].type, "length", None)
        if length and len(value) > length and not table.c[name].primary_key:
            value = value[:length]
        out[name] = value
    return out


def spool_json(payload: dict[str, Any]) -> str:
    """A record as the spool stores it: JSON by orjson, which writes a prediction record
    (kilobytes of base64 images, a few hundred feature floats) ~20x faster than `json`; the
    spool write is on a request's path, before its answer. Spools written by `json` (older
    versions: spaces after separators) read the same. Non-finite floats become null, as in the
    answer the client got (pydantic writes them so)."""
    return orjson.dumps(payload, default=str).decode()


def spooled_id_prefixes(prediction_id: str) -> tuple[str, str]:
    """How a spooled prediction payload with this id starts, as this version and as older
    ones (`json.dumps`) wrote it: the record's first key is its id (`prediction_record`)."""
    return spool_json({"id": prediction_id})[:-1], json.dumps({"id": prediction_id})[:-1]


class Spool:
    """An append-only local queue in one SQLite file, locked by its owner process."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)  # it holds uploaded images
        self.path = path
        lock_fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._lock_file = os.fdopen(lock_fd, "a+")  # held for life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise
        private_file(path)  # SQLite gives its -wal and -shm files the same mode
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit reaches the disk (survives power loss); NORMAL: survives the
        # process being killed, not the machine losing power
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        # FAST: a flushed record's bytes are zeroed where that costs no extra write. This
        # SQLite's default (ON) zeroed every freed page: deleting a record with images cost 4x
        # its writing (~100 us). The file is private to the service, which stores the same
        # images in its database.
        self._db.execute("PRAGMA secure_delete=FAST")
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

    def put(self, records: Records) -> None:
        self.put_groups([records])

    def put_groups(self, groups: list[Records]) -> None:
        """Append the records of many requests in one transaction, in order (parents before
        children): one commit for all of them."""
        rows = [(kind, spool_json(payload)) for records in groups for kind, payload in records]
        with self._mutex:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO spool (kind, payload) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def take(self, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT seq, kind, payload FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(seq, kind, orjson.loads(payload)) for seq, kind, payload in rows]

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


def _row(table: Table, payload: dict[str, Any]) -> dict[str, Any]:
    row = storable(table, payload)
    for name in DATETIME_FIELDS:
        if isinstance(row.get(name), str):
            row[name] = dt.datetime.fromisoformat(row[name])
    return row


def feedback_record(prediction_id: str, label: str) -> dict[str, Any]:
    """A `feedback` record as `POST /feedback` and `cvops label pull` write it (through
    :func:`write_batch`: one label per prediction, the newest wins)."""
    return {
        "id": str(uuid.uuid4()),
        "prediction_id": prediction_id,
        "label": label,
        "created_on": dt.datetime.now(dt.UTC).isoformat(),
    }


def write_batch(engine: Engine, records: Records) -> None:
    """Insert a batch in one transaction; rows already there are skipped (exactly once), and a
    prediction's feedback replaces an older label (one label per prediction, the latest wins)."""
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    with engine.begin() as conn:
        for kind in ("prediction", "api_log", "feedback"):  # parents first (api_log -> predictions)
            rows = [_row(TABLES[kind], p) for k, p in records if k == kind]
            if not rows:
                continue
            statement = insert(TABLES[kind])
            if kind == "feedback":
                rows = _latest_per_prediction(rows)
                newer = statement.excluded.created_on >= TABLES[kind].c.created_on
                statement = statement.on_conflict_do_update(
                    index_elements=["prediction_id"],
                    set_={c: statement.excluded[c] for c in ("id", "label", "created_on")},
                    where=newer,
                )
            else:
                statement = statement.on_conflict_do_nothing()
            conn.execute(statement, rows)


def _latest_per_prediction(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One feedback row per prediction within a batch (an upsert cannot touch a row twice)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = latest.get(row["prediction_id"])
        if seen is None or row["created_on"] >= seen["created_on"]:
            latest[row["prediction_id"]] = row
    return list(latest.values())


class TurnCommit:
    """The records of every request that finishes in one turn of the event loop, spooled in
    one commit at the end of that turn, on the event loop itself.

    At c=32 a model call's requests finish together: one commit for all of them. At c=1 the
    request waits for its commit anyway; the spool-writer thread this replaced cost two thread
    wake-ups per hand-over (~0.5 of the ~1 ms the spool stage took, issue 14). The loop is
    blocked meanwhile, as it would be waiting; the fsync releases the GIL for the worker's
    other threads. Made per worker at start."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._groups: list[Records] = []
        self._done: asyncio.Future[None] | None = None

    async def write(self, records: Records) -> None:
        """Returns once `records` are on disk (raises what the spool raised)."""
        if self._done is None:
            loop = asyncio.get_running_loop()
            self._done = loop.create_future()
            loop.call_soon(self._hand_over)
        self._groups.append(records)
        # shielded: a request cancelled while it waits must not cancel the others' wait
        await asyncio.shield(self._done)

    def _hand_over(self) -> None:
        groups, done = self._groups, self._done
        self._groups, self._done = [], None
        assert done is not None
        try:
            self.recorder.write_groups(groups)
        except Exception as err:  # disk full, ...: every waiting request hears of it
            done.set_exception(err)
        else:
            done.set_result(None)


class Recorder:
    """Owns this worker's spool and the flusher thread."""

    def __init__(
        self,
        db_url: str,
        spool_dir: Path,
        *,
        batch_size: int = 200,
        interval_s: float = 0.5,
        fsync: bool = True,
        on_dead_letter: Callable[[str], None] | None = None,
        input_buffer_bytes: int = 64 * 1024 * 1024,
        image_storage: CentralStorage | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.engine = make_engine(db_url)
        self.spool_dir = spool_dir
        # `spool`: one adopted from a process that is gone, to drain (see `drain_spool`)
        self.spool = spool or Spool(
            spool_dir / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.db", fsync
        )
        self.batch_size = batch_size
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        # records spooled since the flusher last ran: it is woken early only for a full batch
        # (one flush per record cost more CPU than the request itself at low load)
        self._spooled_since_flush = 0
        self._spooled_lock = threading.Lock()  # counted by every thread that spools
        self._next_orphan_scan = 0.0
        self._thread = threading.Thread(target=self._run, name="db-flusher", daemon=True)
        self._schema_ready = False
        self.db_available = False
        self.dead_letters = 0
        self._on_dead_letter = on_dead_letter
        # prediction id -> (model input, original width, height, when held), until written
        self._inputs: dict[str, tuple[np.ndarray, int, int, float]] = {}
        self._inputs_bytes = 0
        self._inputs_limit = input_buffer_bytes
        self._inputs_lock = threading.Lock()
        self.inputs_dropped = 0
        # central storage for the images (None: they stay in the rows), and the predictions
        # whose images it already holds (a batch retried after a DB outage is not re-sent)
        self.image_storage = image_storage
        self._fsync = fsync
        self._images_stored: set[str] = set()

    def keep_input(self, prediction_id: str, x: np.ndarray, width: int, height: int) -> None:
        """Hold a prediction's model input until the flusher measures its image properties;
        beyond the memory bound it is dropped (that row is stored without properties)."""
        with self._inputs_lock:
            if self._inputs_bytes + x.nbytes > self._inputs_limit:
                self.inputs_dropped += 1
                return
            self._inputs[prediction_id] = (x, width, height, time.monotonic())
            self._inputs_bytes += x.nbytes

    def _prune_inputs(self, max_age_s: float = 60.0) -> None:
        """Drop inputs held for long while this worker's spool is empty: their requests never
        spooled a record (failed after inference), so no flush would release them."""
        if not self._inputs or self.spool.pending():
            return
        cutoff = time.monotonic() - max_age_s
        with self._inputs_lock:
            for key in [k for k, held in self._inputs.items() if held[3] < cutoff]:
                self._inputs_bytes -= self._inputs.pop(key)[0].nbytes

    def _release_inputs(self, records: Records) -> None:
        """Forget the inputs of predictions now written (or dead-lettered)."""
        with self._inputs_lock:
            for kind, payload in records:
                if kind == "prediction":
                    held = self._inputs.pop(str(payload.get("id")), None)
                    if held is not None:
                        self._inputs_bytes -= held[0].nbytes
                    self._images_stored.discard(str(payload.get("id")))

    def _store_images(self, records: Records) -> None:
        """Move the images of the batch's predictions to central storage, all before any row
        is written: each record loses its base64 images and its `prediction_json` gains the
        keys. ImageStoreUnavailable (the batch stays spooled, retried) when storage fails."""
        assert self.image_storage is not None
        objects: dict[str, bytes] = {}
        moved: list[str] = []
        for kind, payload in records:
            if kind != "prediction" or not payload.get("input_img"):
                continue
            prediction_id = str(payload.get("id"))
            try:
                keys, images = stored_objects(payload)
                for key in images:
                    self.image_storage.check_relative(key)
            except (StoragePathError, ValueError, KeyError) as err:  # keep this one inline
                log.warning("images of prediction %s stay in the DB: %s", prediction_id, err)
                continue
            if prediction_id not in self._images_stored:
                objects.update(images)
            payload["prediction_json"] = {**(payload.get("prediction_json") or {}), **keys}
            payload["input_img"] = payload["raw_hm_img"] = payload["overlaid_img"] = None
            moved.append(prediction_id)
        try:
            self.image_storage.write_objects(objects, fsync=self._fsync)
        except Exception as err:
            raise ImageStoreUnavailable(
                f"central storage {self.image_storage.url} did not take {len(objects)} "
                f"images: {type(err).__name__}: {err}"
            ) from err
        self._images_stored.update(moved)

    def _add_properties(self, records: Records) -> None:
        """`image_props` of every prediction whose model input is held. The input stays held
        until the row is written: a batch re-read from the spool after an outage is measured
        again."""
        for kind, payload in records:
            if kind != "prediction" or "image_props" in payload:
                continue
            with self._inputs_lock:
                held = self._inputs.get(str(payload.get("id")))
            if held is None:
                continue
            try:
                props = input_properties(*held[:3])
            except Exception:  # a property is never worth a lost prediction row
                log.exception("image properties of prediction %s failed", payload.get("id"))
                continue
            payload["image_props"] = {k: v for k, v in props.items() if math.isfinite(v)}

    def record(self, records: Records) -> None:
        """Spool one request's records (on disk when this returns)."""
        self.write_groups([records])

    def write_groups(self, groups: list[Records]) -> None:
        """Spool the records of many requests in one commit (group commit), in the caller's
        thread; the flusher is woken early once a full batch waits."""
        self.spool.put_groups(groups)
        with self._spooled_lock:
            self._spooled_since_flush += sum(len(records) for records in groups)
            full = self._spooled_since_flush >= self.batch_size
        if full:
            self._wake.set()

    def pending(self) -> int:
        return self.spool.pending()

    def prediction_known(self, prediction_id: str, settle_s: float = 1.0) -> bool | None:
        """Whether a prediction with this id exists: in the DB or still in a spool of this
        host. None when the DB cannot tell (down). Rechecked for `settle_s`, because the
        answer to /predict can reach a client before its record reaches the spool."""
        deadline = time.monotonic() + settle_s
        while True:
            if not self.db_available:
                return None
            try:
                with self.engine.connect() as conn:
                    found = conn.execute(
                        select(Prediction.id).where(Prediction.id == prediction_id)
                    ).first()
            except SQLAlchemyError as err:
                log.debug("cannot tell whether prediction %s exists: %s", prediction_id, err)
                return None
            if found is not None or self._in_spools(prediction_id):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _in_spools(self, prediction_id: str) -> bool:
        # a prediction payload starts with its id (exact comparison: an id is no pattern)
        new, old = spooled_id_prefixes(prediction_id)
        query = (
            "SELECT 1 FROM spool WHERE kind = 'prediction' AND (substr(payload, 1, ?) = ? OR "
            "substr(payload, 1, ?) = ?) LIMIT 1"
        )
        prefix = (len(new), new, len(old), old)
        for path in self.spool_dir.glob("spool-*.db"):
            try:
                if path == self.spool.path:
                    with self.spool._mutex:
                        hit = self.spool._db.execute(query, prefix).fetchone()
                else:
                    with contextlib.closing(
                        sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
                    ) as db:
                        hit = db.execute(query, prefix).fetchone()
            except sqlite3.Error:
                continue  # a spool being removed or not yet created
            if hit:
                return True
        return False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # a recorder stopped before it started still flushes
            self._thread.join(timeout)
        try:
            self._flush_spool(self.spool)
        except (SQLAlchemyError, ImageStoreUnavailable) as err:
            log.warning(
                "DB or image storage unavailable at shutdown (%s): %d records stay spooled in %s",
                type(err).__name__,
                self.spool.pending(),
                self.spool.path,
            )
        self.spool.close()
        self.engine.dispose()

    def drain(self) -> int:
        """Write every record of this recorder's spool now, then close it (removed when
        empty); the database errors of a flush propagate, and the records stay spooled."""
        try:
            return self._flush_spool(self.spool)
        finally:
            self.spool.close()
            self.engine.dispose()

    def _flush_spool(self, spool: Spool) -> int:
        if not self._schema_ready:
            upgrade_schema(self.engine)
            self._schema_ready = True
        moved = 0
        while batch := spool.take(self.batch_size):
            records = [(kind, payload) for _, kind, payload in batch]
            self._add_properties(records)
            if self.image_storage is not None:
                self._store_images(records)
            self._write_or_split(records)
            self._release_inputs(records)
            spool.delete_upto(batch[-1][0])
            moved += len(batch)
        return moved

    def _write_or_split(self, records: Records) -> None:
        """Write a batch; if the database refuses it (and is not simply unreachable), halve it
        until the refused records are isolated and dead-lettered. Halves keep spool order, so
        a prediction is still written before its api_log row."""
        try:
            write_batch(self.engine, records)
        except Exception as err:
            if db_unreachable(err):
                raise
            if len(records) == 1:
                kind, payload = records[0]
                self.dead_letter(kind, payload, refusal_reason(err))
                return
            middle = len(records) // 2
            self._write_or_split(records[:middle])
            self._write_or_split(records[middle:])

    def dead_letter(self, kind: str, payload: dict[str, Any], reason: str) -> None:
        """Keep a record the database will never accept, with the reason, where an operator
        finds it: the `dead_letters` table, else a 0600 JSON-lines file beside the spool."""
        record_id = str(payload.get("id") or uuid.uuid4())
        try:
            self._dead_letter_db(kind, record_id, payload, reason)
            where = "table dead_letters"
        except Exception as err:
            if db_unreachable(err):
                raise  # keep it spooled; it is retried (and judged again) when the DB is back
            self._dead_letter_file(kind, payload, reason, refusal_reason(err))
            where = str(self.spool_dir / DEAD_LETTER_FILE)
        self.dead_letters += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(kind)
        log.error(
            "Prediction DB refused a %s record (id %s): %s; kept in %s",
            kind,
            record_id,
            reason,
            where,
        )

    def _dead_letter_db(
        self, kind: str, record_id: str, payload: dict[str, Any], reason: str
    ) -> None:
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        row = {
            "id": record_id,
            "kind": kind,
            "record_id": record_id,
            "reason": reason,
            "payload": json.dumps(payload, default=str),  # ASCII: NULs escaped
            "created_on": dt.datetime.now(dt.UTC),
        }
        with self.engine.begin() as conn:
            conn.execute(insert(DeadLetter.__table__).on_conflict_do_nothing(), [row])

    def _dead_letter_file(
        self, kind: str, payload: dict[str, Any], reason: str, table_error: str
    ) -> None:
        path = self.spool_dir / DEAD_LETTER_FILE
        line = json.dumps(
            {
                "kind": kind,
                "reason": reason,
                "dead_letter_table_error": table_error,
                "created_on": dt.datetime.now(dt.UTC).isoformat(),
                "record": payload,
            },
            default=str,
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _orphans(self) -> list[Spool]:
        mine = self.spool.path
        adopted = []
        for path in sorted(self.spool_dir.glob("spool-*.db")):
            if path != mine and (spool := Spool.adopt(path)) is not None:
                adopted.append(spool)
        return adopted

    def _flush_all(self) -> None:
        self._spooled_since_flush = 0
        self._flush_spool(self.spool)
        self._prune_inputs()
        if time.monotonic() < self._next_orphan_scan:
            return
        self._next_orphan_scan = time.monotonic() + ORPHAN_SCAN_S
        for orphan in self._orphans():
            try:
                moved = self._flush_spool(orphan)
                if moved:
                    log.info("Wrote %d records left by a stopped worker (%s)", moved, orphan.path)
            finally:
                orphan.close()

    def _run(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type((SQLAlchemyError, ImageStoreUnavailable)),
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
        err = state.outcome.exception()
        if isinstance(err, ImageStoreUnavailable):  # the DB may well answer: feedback checks it
            if state.attempt_number == 1:
                log.warning("%s; %d records spooled on disk, retrying", err, self.spool.pending())
            return
        if self.db_available or state.attempt_number == 1:
            log.warning(
                "Prediction DB unavailable (%s); %d records spooled on disk, retrying",
                type(err).__name__,
                self.spool.pending(),
            )
        self.db_available = False


class SpoolBusy(RuntimeError):
    """A live process still holds this spool (it flushes it itself)."""


def drain_spool(db_url: str, path: Path, image_storage: CentralStorage | None = None) -> int:
    """Move the records of a spool file left behind (a dead host's disk, a replica's volume)
    into the database with the service's own flush: ids are client-generated and inserts skip
    rows already there, so draining twice, or a spool partly flushed before its process died,
    lands every record exactly once. Returns the records moved."""
    spool = Spool.adopt(path)
    if spool is None:
        raise SpoolBusy(f"{path} is held by a running process, which flushes it itself")
    return Recorder(db_url, path.parent, spool=spool, image_storage=image_storage).drain()
