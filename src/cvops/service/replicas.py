"""Which model every replica serves, on any host: state in the prediction database.

One `model_state` row per deployment holds the desired metadata file and its generation; every
`PUT /update_model` raises the generation with one atomic upsert (concurrent publishes on any
host get distinct generations). Every serving process is one `replicas` row (`<host>:<pid>`):
it polls the desired row every `reload_poll_s`, loads what it names, and reports the generation
it settled on (ok, or why it could not load) with a heartbeat every `heartbeat_s`. A replica
silent for longer than `heartbeat_lapse_s` no longer counts, and its row is deleted later.

Polling, not Postgres LISTEN/NOTIFY: measured in docs/scaling.md (benchmarks/model_sync.py),
the poll costs well under a millisecond of database time, and the propagation time of a swap
is the model load, not the wait for the poll; polling also works on SQLite and needs no extra
connection per replica nor a catch-up read after a dropped one.

Times are the database's clock on Postgres (hosts' clocks may disagree), this host's on SQLite
(one host by definition).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from cvops.records.schema import DesiredModel, Replica

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Desired:
    generation: int
    metadata_file: str


@dataclass(frozen=True)
class ReplicaReport:
    """What one replica says about itself in its heartbeat."""

    generation: int
    ok: bool = True
    detail: str | None = None
    metadata_file: str | None = None
    model_version: str | None = None


@dataclass(frozen=True)
class ReplicaRow:
    id: str
    host: str
    pid: int
    generation: int
    ok: bool
    detail: str | None
    model_version: str | None


class ModelState:
    """This process's view of its deployment's model state (blocking calls: run them in a
    thread). Every call may raise SQLAlchemyError when the database is unreachable."""

    def __init__(self, engine: Engine, deployment: str, host: str, pid: int | None = None):
        self.engine = engine
        self.deployment = deployment
        self.host = host
        self.pid = os.getpid() if pid is None else pid
        self.replica_id = f"{host}:{self.pid}"
        self.started_on = dt.datetime.now(dt.UTC)
        self._postgres = engine.dialect.name == "postgresql"

    def _now(self) -> Any:
        return func.now() if self._postgres else dt.datetime.now(dt.UTC)

    def _ago(self, seconds: float) -> Any:
        delta = dt.timedelta(seconds=seconds)
        return func.now() - delta if self._postgres else dt.datetime.now(dt.UTC) - delta

    def _insert(self) -> Any:
        return postgresql.insert if self._postgres else sqlite.insert

    def desired(self) -> Desired | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(DesiredModel.generation, DesiredModel.metadata_file).where(
                    DesiredModel.deployment == self.deployment
                )
            ).first()
        return Desired(row.generation, row.metadata_file) if row else None

    def seed(self, metadata_file: str) -> Desired:
        """The desired model, set to `metadata_file` (generation 1) only if there is none yet:
        a replica's start-up choice never overrides what the deployment already serves."""
        statement = (
            self._insert()(DesiredModel)
            .values(self._row(metadata_file, 1))
            .on_conflict_do_nothing(index_elements=["deployment"])
        )
        with self.engine.begin() as conn:
            conn.execute(statement)
            row = conn.execute(
                select(DesiredModel.generation, DesiredModel.metadata_file).where(
                    DesiredModel.deployment == self.deployment
                )
            ).one()
        return Desired(row.generation, row.metadata_file)

    def publish(self, metadata_file: str) -> Desired:
        """The next generation, naming `metadata_file`: one upsert that increments under the
        row's lock, so publishes from any number of hosts at once get distinct generations."""
        insert = self._insert()(DesiredModel).values(self._row(metadata_file, 1))
        statement = insert.on_conflict_do_update(
            index_elements=["deployment"],
            set_={
                "generation": DesiredModel.generation + 1,
                "metadata_file": insert.excluded.metadata_file,
                "updated_on": insert.excluded.updated_on,
                "updated_by": insert.excluded.updated_by,
            },
        ).returning(DesiredModel.generation)
        with self.engine.begin() as conn:
            generation = conn.execute(statement).scalar_one()
        return Desired(generation, metadata_file)

    def _row(self, metadata_file: str, generation: int) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "metadata_file": metadata_file,
            "generation": generation,
            "updated_on": self._now(),
            "updated_by": self.replica_id,
        }

    def report(self, state: ReplicaReport) -> None:
        """Heartbeat with this replica's whole state: an upsert, so a row deleted while this
        replica was cut off from the database comes back with the next beat."""
        values = {
            "generation": state.generation,
            "ok": state.ok,
            "detail": state.detail,
            "metadata_file": state.metadata_file,
            "model_version": state.model_version,
            "heartbeat": self._now(),
        }
        insert = self._insert()(Replica).values(
            id=self.replica_id,
            deployment=self.deployment,
            host=self.host,
            pid=self.pid,
            started_on=self.started_on,
            **values,
        )
        statement = insert.on_conflict_do_update(
            index_elements=["id"],
            set_={**values, "deployment": self.deployment, "started_on": self.started_on},
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def leave(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(Replica).where(Replica.id == self.replica_id))

    def live(self, lapse_s: float) -> list[ReplicaRow]:
        """Replicas of this deployment heard from within `lapse_s`."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Replica.id,
                    Replica.host,
                    Replica.pid,
                    Replica.generation,
                    Replica.ok,
                    Replica.detail,
                    Replica.model_version,
                )
                .where(Replica.deployment == self.deployment)
                .where(Replica.heartbeat >= self._ago(lapse_s))
                .order_by(Replica.id)
            ).all()
        return [ReplicaRow(*row) for row in rows]

    def prune(self, older_than_s: float) -> int:
        """Delete the rows of replicas silent for longer than `older_than_s` (any deployment:
        a renamed deployment's old rows go too)."""
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(Replica).where(Replica.heartbeat < self._ago(older_than_s))
            )
        return result.rowcount or 0
