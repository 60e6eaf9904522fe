"""Record tables (reference names and columns) and schema migration via Alembic.

Ids are client-generated UUID strings (the reference used serial ints) so that a record spooled
during an outage can be re-sent any number of times and still lands exactly once.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def float_array_literal(values: Sequence[float | None] | None) -> str | None:
    """A float8[] as Postgres' text literal (`{0.5,NULL,NaN}`): orjson writes the numbers,
    so a row's ~100 features cost ~2 us instead of ~100 us in psycopg's list dumper."""
    if values is None:
        return None
    if hasattr(values, "tolist"):  # a NumPy array
        values = values.tolist()
    body = orjson.dumps(values, default=float)  # NumPy scalars: as float() reads them
    if b"null" in body and any(v is not None and not math.isfinite(v) for v in values):
        # orjson writes NaN and infinities as null; Postgres reads Python's spelling of them
        return "{" + ",".join("NULL" if v is None else repr(float(v)) for v in values) + "}"
    return "{" + body[1:-1].decode() + "}"


class PgFloatArray(TypeDecorator[Sequence[float | None]]):
    """float8[] bound as one text literal (`float_array_literal`): psycopg's list dumper
    formats and regex-checks every element in Python, a third of the request-log flusher's
    time under load (issue 14). Read back as the array type reads it."""

    impl = postgresql.ARRAY(Float)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], str | None]:
        return float_array_literal


# none_as_null: a missing feature vector is SQL NULL, not the JSON text "null"
FloatArray = JSON(none_as_null=True).with_variant(PgFloatArray(), "postgresql")


class Base(DeclarativeBase):
    pass


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    input_img: Mapped[str | None] = mapped_column(Text)
    raw_hm_img: Mapped[str | None] = mapped_column(Text)
    overlaid_img: Mapped[str | None] = mapped_column(Text)
    prediction_json: Mapped[dict] = mapped_column(JSON)
    uae_feats: Mapped[list[float]] = mapped_column(FloatArray)
    bbsd_feats: Mapped[list[float]] = mapped_column(FloatArray)
    hidden_feats: Mapped[list[float] | None] = mapped_column(FloatArray, nullable=True)
    # {property: value} of the upload (cvops.data.properties); NULL for rows written before
    # revision 0008 or whose properties could not be computed
    image_props: Mapped[dict[str, float] | None] = mapped_column(
        JSON(none_as_null=True), nullable=True
    )
    created_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class ApiLog(Base):
    __tablename__ = "api_log"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    method: Mapped[str] = mapped_column(String(32))  # VARCHAR(10) refused "UNSUBSCRIBE"
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    timespan: Mapped[float] = mapped_column(Float)
    created_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    prediction_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("predictions.id"), nullable=True
    )


class Feedback(Base):
    """The true label of a prediction: one per prediction, the latest sent wins. No foreign
    key on purpose: the prediction may still be spooled in another worker when its feedback
    arrives."""

    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    prediction_id: Mapped[str] = mapped_column(String(36), index=True, unique=True)
    label: Mapped[str] = mapped_column(String(200))
    created_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class DeadLetter(Base):
    """A record the database refused (never retried): its kind, the reason and the payload as
    JSON, so that an operator can see it, fix it and insert it by hand."""

    __tablename__ = "dead_letters"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    record_id: Mapped[str | None] = mapped_column(String(36), index=True)
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    created_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class DriftReport(Base):
    """One row per monitor run x embedding x method: drift results are data, not just logs."""

    __tablename__ = "drift_reports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), index=True)
    created_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    window_start: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    sample_size: Mapped[int] = mapped_column(Integer)
    reference_size: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(40))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    drifted: Mapped[bool] = mapped_column(Boolean)


class DriftCause(Base):
    """Why a monitor run's window differs from the reference (one row per run, next to its
    `drift_reports` rows): the sentence, the top cause and the ranked evidence as JSON
    (`cvops.monitor.causes.CauseReport.as_dict`)."""

    __tablename__ = "drift_causes"

    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    drifted: Mapped[bool] = mapped_column(Boolean)
    sentence: Mapped[str] = mapped_column(Text)
    top_cause: Mapped[str | None] = mapped_column(String(40))
    details: Mapped[dict] = mapped_column(JSON)


class LabellingTask(Base):
    """A prediction sent to Label Studio (`cvops label push`) and what came back
    (`cvops label pull`): the arm that picked it (a strategy, or the random control), the
    answer counted last and the dataset version that holds it, so that push never sends an
    image twice and pull never adds one twice."""

    __tablename__ = "labelling_tasks"

    prediction_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    project_id: Mapped[int] = mapped_column(Integer)
    arm: Mapped[str] = mapped_column(String(40))
    priority: Mapped[float | None] = mapped_column(Float)
    predicted: Mapped[str | None] = mapped_column(String(200))
    confidence: Mapped[float | None] = mapped_column(Float)
    sent_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    task_id: Mapped[int | None] = mapped_column(Integer)
    annotation_id: Mapped[int | None] = mapped_column(Integer)
    annotation_updated: Mapped[str | None] = mapped_column(String(40))
    label: Mapped[str | None] = mapped_column(String(200))
    labelled_on: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    dataset_tag: Mapped[str | None] = mapped_column(String(64))
    dataset_path: Mapped[str | None] = mapped_column(Text)


class DesiredModel(Base):
    """The model every replica of a deployment should serve; `generation` rises by one with
    each publish (`cvops.service.replicas`), so a replica knows whether it is behind."""

    __tablename__ = "model_state"

    deployment: Mapped[str] = mapped_column(String(100), primary_key=True)
    metadata_file: Mapped[str] = mapped_column(String(255))
    generation: Mapped[int] = mapped_column(Integer)
    updated_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(255))


class Replica(Base):
    """One serving process (`<host>:<pid>`): the generation it settled on (ok, or why it could
    not load it), what it serves, and its heartbeat (a lapsed one no longer counts)."""

    __tablename__ = "replicas"
    __table_args__ = (Index("ix_replicas_deployment_heartbeat", "deployment", "heartbeat"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(100))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    ok: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str | None] = mapped_column(Text)
    metadata_file: Mapped[str | None] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(64))
    heartbeat: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    started_on: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


def private_file(path: Path) -> None:
    """Create `path` (if missing) readable by its owner only: these files hold uploads."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.chmod(0o600)


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
            private_file(path)
    args = {"connect_timeout": 3} if url.startswith("postgresql") else {"timeout": 10}
    return create_engine(url, pool_pre_ping=True, connect_args=args)


# any constant: the key of the Postgres advisory lock that serialises migrations
MIGRATION_LOCK = 0x63766F7073
# Alembic's `context` is process-global: two threads migrating at once break each other
_migrating = threading.Lock()


def upgrade_schema(engine: Engine) -> None:
    """Create or migrate the tables (idempotent; safe to call from every worker). On Postgres
    under an advisory lock: replicas on several hosts start together against one database, and
    two concurrent CREATE TABLEs would fail one of them."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with _migrating, engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def latest_drift_rows(engine: Engine, model_name: str) -> list[DriftReport]:
    """Rows of the newest monitor run for a model (empty before the first run)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        newest = session.scalars(
            select(DriftReport.run_id)
            .where(DriftReport.model_name == model_name)
            .order_by(DriftReport.created_on.desc())
            .limit(1)
        ).first()
        if newest is None:
            return []
        return list(session.scalars(select(DriftReport).where(DriftReport.run_id == newest)))


def latest_drift_cause(engine: Engine, model_name: str) -> DriftCause | None:
    """The cause row of the newest monitor run that has one (None before the first)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        return session.scalars(
            select(DriftCause)
            .where(DriftCause.model_name == model_name)
            .order_by(DriftCause.created_on.desc())
            .limit(1)
        ).first()
