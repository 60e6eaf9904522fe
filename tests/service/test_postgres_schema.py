"""The prediction schema on a real PostgreSQL 15: what the migrations leave there."""

from __future__ import annotations

import numpy as np
from sqlalchemy import text

from cvops.records.schema import make_engine, upgrade_schema
from cvops.service.recording import write_batch


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


def test_feature_arrays_land_as_they_were_sent(postgres) -> None:
    """Feature vectors are bound as one float8[] literal (`float_array_literal`, not
    psycopg's per-element dumper): every value reads back as it was, the non-finite ones,
    missing elements and NumPy scalars included."""
    engine = make_engine(postgres.url())
    vectors = {
        "plain": [0.1, 1e-7, 3, -2.5, 1.5e300, 5e-324],
        "non-finite": [float("nan"), float("inf"), -float("inf"), None, 2.0],
        "numpy": list(np.float32([0.25, 1 / 3])) + [np.float64(0.1)],
        "ndarray": np.float32([0.5, 1 / 3]),
        "empty": [],
    }
    try:
        upgrade_schema(engine)
        write_batch(
            engine,
            [
                (
                    "prediction",
                    {
                        "id": name,
                        "model_name": "m",
                        "model_version": "1",
                        "prediction_json": {"predicted_class": "a"},
                        "uae_feats": values,
                        "bbsd_feats": values,
                        "hidden_feats": None,
                        "created_on": "2026-12-04T00:00:00+00:00",
                    },
                )
                for name, values in vectors.items()
            ],
        )
        with engine.connect() as conn:
            rows = {
                r.id: r
                for r in conn.execute(text("SELECT id, uae_feats, hidden_feats FROM predictions"))
            }
    finally:
        engine.dispose()
    for name, values in vectors.items():
        expected = [None if v is None else float(v) for v in values]
        stored = rows[name].uae_feats
        assert len(stored) == len(expected), name
        for got, want in zip(stored, expected, strict=True):
            assert (got is None and want is None) or got == want or (got != got and want != want)
        assert rows[name].hidden_feats is None
