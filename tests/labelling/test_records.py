"""labelling_tasks (revision 0009) and the candidate query on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import inspect

from cvops.labelling.loop import candidate_pool
from cvops.records.schema import LabellingTask, make_engine, upgrade_schema
from cvops.service.recording import feedback_record, write_batch
from tests.labelling.test_loop import CLASSES_3, insert_predictions


def check_candidates(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade_schema(engine)
        upgrade_schema(engine)  # idempotent
        assert "labelling_tasks" in inspect(engine).get_table_names()
        ids = insert_predictions(engine, 6, model_name="m")
        insert_predictions(engine, 2, model_name="m", seed=1, images=False)
        with engine.begin() as conn:
            conn.execute(
                LabellingTask.__table__.insert(),
                [
                    {
                        "prediction_id": ids[0],
                        "model_name": "m",
                        "project_id": 1,
                        "arm": "random",
                        "sent_on": dt.datetime.now(dt.UTC),
                    }
                ],
            )
        write_batch(engine, [("feedback", feedback_record(ids[1], CLASSES_3[0]))])
        pool = candidate_pool(engine, "m", "1", CLASSES_3, limit=100)
        assert set(pool.ids) == set(ids[2:])  # sent and labelled ones are skipped
        assert pool.without_image == 2 and pool.probs.shape == (4, 3)
        assert pool.features["uae"].shape == (4, 4) and "hidden" not in pool.features
        assert candidate_pool(engine, "m", "2", CLASSES_3, limit=100).ids == []
        assert len(candidate_pool(engine, "m", None, CLASSES_3, limit=2).ids) == 2
    finally:
        engine.dispose()


def test_records_and_candidates_on_sqlite(tmp_path) -> None:
    check_candidates(f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}")


@pytest.mark.slow
def test_records_and_candidates_on_postgres(postgres_url: str) -> None:
    check_candidates(postgres_url)
