"""Feedback names a real prediction and keeps one label per prediction (the latest wins)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from cvops.records.schema import make_engine, upgrade_schema
from cvops.service.app import create_app
from cvops.service.recording import write_batch
from tests.pg import wait_until
from tests.service.conftest import free_port, image_bytes


def labels(url: str) -> list[tuple[str, str]]:
    with create_engine(url).connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT prediction_id, label FROM feedback"))]


def test_unknown_prediction_is_404_and_the_latest_label_wins(client, settings) -> None:
    unknown = uuid.uuid4()
    answer = client.post(f"/feedback/{unknown}", json={"label": "square"})
    assert answer.status_code == 404 and str(unknown) in answer.json()["detail"]
    pid = client.post("/predict", files={"file": ("x.png", image_bytes())}).json()["prediction_id"]
    # at once: the prediction may still be on its way to the spool
    assert client.post(f"/feedback/{pid}", json={"label": "square"}).status_code == 200
    assert client.post(f"/feedback/{pid}", json={"label": "circle"}).status_code == 200
    url = settings.resolved_db_url
    assert wait_until(lambda: labels(url) == [(pid, "circle")], 10), labels(url)
    # sent again, in one batch with an older one: still one row, still the latest label
    now = dt.datetime.now(dt.UTC)
    write_batch(
        make_engine(url),
        [
            ("feedback", feedback(pid, "triangle", now + dt.timedelta(seconds=5))),
            ("feedback", feedback(pid, "square", now - dt.timedelta(seconds=5))),
        ],
    )
    assert labels(url) == [(pid, "triangle")]
    write_batch(make_engine(url), [("feedback", feedback(pid, "square", now))])  # older
    assert labels(url) == [(pid, "triangle")]


def feedback(pid: str, label: str, when: dt.datetime) -> dict:
    return {"id": str(uuid.uuid4()), "prediction_id": pid, "label": label, "created_on": when}


def test_feedback_is_accepted_while_the_db_cannot_tell(settings) -> None:
    """Postgres unreachable (nothing listens there): the label is spooled, not refused."""
    down = settings.model_copy(
        update={"db_url": f"postgresql://postgres@127.0.0.1:{free_port()}/service"}
    )
    with TestClient(create_app(down)) as c:
        answer = c.post(f"/feedback/{uuid.uuid4()}", json={"label": "square"})
        assert answer.status_code == 200
        assert c.app.state.svc.recorder.pending() == 1 + 1  # the feedback and its api_log


def test_migration_collapses_existing_duplicates(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    engine = make_engine(url)
    from alembic.config import Config

    from cvops.records.schema import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0005")
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as conn:
        for i, (pid, label) in enumerate([("p1", "a"), ("p1", "b"), ("p2", "c"), ("p1", "d")]):
            conn.execute(
                text("INSERT INTO feedback VALUES (:id, :pid, :label, :at)"),
                {"id": f"f{i}", "pid": pid, "label": label, "at": t0 + dt.timedelta(minutes=i)},
            )
    upgrade_schema(engine)
    assert sorted(labels(url)) == [("p1", "d"), ("p2", "c")]
