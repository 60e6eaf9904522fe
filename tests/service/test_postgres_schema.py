"""The prediction schema on a real PostgreSQL 15: what the migrations leave there."""

from __future__ import annotations

from sqlalchemy import text

from cvops.records.schema import make_engine, upgrade_schema


def test_images_are_stored_without_recompression(postgres) -> None:
    """Base64 images are already compressed: TOAST compression only burnt CPU (0007)."""
    engine = make_engine(postgres.url())
    try:
        upgrade_schema(engine)
        upgrade_schema(engine)  # every worker runs it: idempotent
        with engine.connect() as conn:
            storage = dict(
                conn.execute(
                    text(
                        "SELECT attname, attstorage FROM pg_attribute"
                        " WHERE attrelid = 'predictions'::regclass AND attnum > 0"
                    )
                ).all()
            )
    finally:
        engine.dispose()
    assert {c: storage[c] for c in ("input_img", "raw_hm_img", "overlaid_img")} == {
        "input_img": "e",
        "raw_hm_img": "e",
        "overlaid_img": "e",
    }
    assert storage["prediction_json"] != "e"  # the rest keeps Postgres' defaults
