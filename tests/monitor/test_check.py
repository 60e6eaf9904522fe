"""Monitor check over a real prediction DB (SQLite, the service's own schema and writer)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from cvops.monitor.run import run_monitor
from cvops.records.schema import make_engine, upgrade_schema
from cvops.service.recording import write_batch
from cvops.storage import CentralStorage, read_metadata
from tests.service.conftest import package

RNG = np.random.default_rng(0)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def features(n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    uae = RNG.normal(shift, 1.0, (n, 32))
    bbsd = softmax(RNG.normal(0, 1.0, (n, 3)) + np.array([shift * 3, 0, 0]))
    return uae, bbsd


@pytest.fixture()
def setup(tmp_path: Path):
    root = tmp_path / "cs"
    metadata_file = package(root, "mon", "3", seed=5)
    storage = CentralStorage(root)
    meta = read_metadata(storage.metadata_path(metadata_file))
    uae, bbsd = features(600)
    pd.DataFrame({"uae_feats": list(uae), "bbsd_feats": list(bbsd), "label": "circle"}).to_parquet(
        storage.resolve(meta.reference_data_path)
    )
    url = f"sqlite:///{tmp_path / 'service.db'}"
    engine = make_engine(url)
    upgrade_schema(engine)
    return storage, metadata_file, url, engine


def insert(
    engine,
    n: int,
    shift: float = 0.0,
    age_days: float = 0.0,
    model: str = "mon",
    hidden_scale: float | None = None,
) -> None:
    """`hidden_scale`: rows also carry 16-d hidden features, N(0, scale²) (1: un-shifted)."""
    uae, bbsd = features(n, shift)
    hidden = RNG.normal(0.0, hidden_scale or 1.0, (n, 16))
    when = dt.datetime.now(dt.UTC) - dt.timedelta(days=age_days)
    rows = [
        (
            "prediction",
            {
                "id": str(uuid.uuid4()),
                "model_name": model,
                "model_version": "3",
                "prediction_json": {},
                "uae_feats": u.tolist(),
                "bbsd_feats": b.tolist(),
                "hidden_feats": h.tolist() if hidden_scale else None,
                "created_on": (when - dt.timedelta(seconds=i)).isoformat(),
            },
        )
        for i, (u, b, h) in enumerate(zip(uae, bbsd, hidden, strict=True))
    ]
    write_batch(engine, rows)


def test_no_drift_then_drift_and_rows_stored(setup) -> None:
    storage, metadata_file, url, engine = setup
    insert(engine, 300)
    calm = run_monitor(storage, metadata_file, url, last_n=300)
    assert calm.window.size == 300 and not calm.drifted
    insert(engine, 300, shift=0.6)  # newer rows: the window now holds only shifted ones
    alarm = run_monitor(storage, metadata_file, url, last_n=300)
    assert alarm.drifted
    assert any(r.drifted for r in alarm.results["uae"]) and any(
        r.drifted for r in alarm.results["bbsd"]
    )
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT run_id, embedding, method, drifted, sample_size FROM drift_reports")
        ).all()
    assert {r.run_id for r in rows} == {calm.run_id, alarm.run_id}
    assert len(rows) == 2 * (len(alarm.results["uae"]) + len(alarm.results["bbsd"]))
    assert {r.sample_size for r in rows} == {300}


def test_hidden_features_join_the_alarm_tests_when_both_sides_have_them(setup) -> None:
    """A shift only the hidden features show (their variance grows, as blur and noise do to the
    pooled conv features): the hidden domain classifier raises the alarm, at alpha / 3."""
    storage, metadata_file, url, engine = setup
    meta = read_metadata(storage.metadata_path(metadata_file))
    uae, bbsd = features(600)
    hidden = RNG.normal(0.0, 1.0, (600, 16))
    pd.DataFrame(
        {
            "uae_feats": list(uae),
            "bbsd_feats": list(bbsd),
            "label": "circle",
            "hidden_feats": list(hidden),
        }
    ).to_parquet(storage.resolve(meta.reference_data_path))
    insert(engine, 300, hidden_scale=1.0)
    calm = run_monitor(storage, metadata_file, url, last_n=300)
    assert set(calm.results) == {"uae", "bbsd", "hidden"} and not calm.drifted
    assert calm.alarm_methods == {"uae": ("mmd",), "bbsd": ("ks",), "hidden": ("classifier",)}
    (ks,) = [r for r in calm.results["bbsd"] if r.method == "ks"]
    assert ks.info["component_level"] == pytest.approx(0.05 / 3 / 4)  # 3 classes + entropy
    insert(engine, 300, hidden_scale=1.6)
    alarm = run_monitor(storage, metadata_file, url, last_n=300)
    assert alarm.drifting_tests == ["hidden/classifier"]
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT method FROM drift_reports WHERE embedding = 'hidden' AND run_id = :r"),
            {"r": alarm.run_id},
        ).scalars()
        assert set(stored) == {"mmd", "ks", "classifier"}


def test_rows_without_hidden_features_fall_back_to_the_pair(setup) -> None:
    """Old prediction rows (no hidden features) against a reference that has them: the pair
    decides, at alpha / 2."""
    storage, metadata_file, url, engine = setup
    meta = read_metadata(storage.metadata_path(metadata_file))
    uae, bbsd = features(600)
    pd.DataFrame(
        {"uae_feats": list(uae), "bbsd_feats": list(bbsd), "label": "circle"}
        | {"hidden_feats": list(RNG.normal(size=(600, 16)))}
    ).to_parquet(storage.resolve(meta.reference_data_path))
    insert(engine, 200)
    check = run_monitor(storage, metadata_file, url, last_n=200)
    assert set(check.results) == {"uae", "bbsd"}
    assert check.alarm_methods == {"uae": ("mmd",), "bbsd": ("ks",)}
    (ks,) = [r for r in check.results["bbsd"] if r.method == "ks"]
    assert ks.info["component_level"] == pytest.approx(0.025 / 4)


def test_window_respects_days_limit_and_model(setup) -> None:
    storage, metadata_file, url, engine = setup
    insert(engine, 50, shift=2.0, age_days=10)  # outside last_days
    insert(engine, 50, model="other", shift=2.0)
    insert(engine, 120)
    check = run_monitor(storage, metadata_file, url, last_days=7, last_n=100)
    assert check.window.size == 100
    assert not check.drifted


def test_empty_window_is_reported_not_crashed(setup) -> None:
    storage, metadata_file, url, _ = setup
    check = run_monitor(storage, metadata_file, url)
    assert check.window.size == 0 and check.results == {} and not check.drifted


def test_live_accuracy_from_feedback(setup) -> None:
    storage, metadata_file, url, engine = setup
    insert(engine, 40)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM predictions ORDER BY id"))]
    # insert() stores no predicted class: give half of them one, then label 20 of those
    with engine.begin() as conn:
        for i in ids:
            conn.execute(
                text("UPDATE predictions SET prediction_json = :j WHERE id = :i"),
                {"j": '{"predicted_class": "circle"}', "i": i},
            )
    now = dt.datetime.now(dt.UTC).isoformat()
    labels = ["circle"] * 15 + ["square"] * 5
    write_batch(
        engine,
        [
            (
                "feedback",
                {"id": str(uuid.uuid4()), "prediction_id": i, "label": lab, "created_on": now},
            )
            for i, lab in zip(ids[:20], labels, strict=True)
        ],
    )
    check = run_monitor(storage, metadata_file, url)
    assert check.labelled == 20 and check.live_accuracy == pytest.approx(0.75)
    with engine.connect() as conn:
        score = conn.execute(
            text("SELECT score FROM drift_reports WHERE method = 'live_accuracy'")
        ).scalar_one()
    assert score == pytest.approx(0.75)


def test_alarm_levels_split_alpha_and_never_exceed_it() -> None:
    from cvops.monitor.check import alpha_levels
    from cvops.monitor.stats import DEFAULT_METHODS

    third = 0.05 / 3
    assert alpha_levels(DEFAULT_METHODS, 0.05) == pytest.approx(
        {"uae": third, "bbsd": third, "hidden": third}
    )
    pair = {"uae": ("mmd",), "bbsd": ("ks",)}  # a package without hidden features
    assert alpha_levels(pair, 0.05) == pytest.approx({"uae": 0.025, "bbsd": 0.025, "hidden": 0.025})
    custom = {"uae": ("mmd", "ks"), "bbsd": ("ks",)}
    levels = alpha_levels(custom, 0.06)
    assert levels == pytest.approx({"uae": 0.02, "bbsd": 0.02, "hidden": 0.02})
    # the sum over alarm tests (each at its embedding's level) is the run's alpha at most
    assert sum(levels[e] for e, methods in custom.items() for _ in methods) <= 0.06 + 1e-12
    assert alpha_levels({"uae": (), "bbsd": ("mmd",)}, 0.05) == pytest.approx(
        {"uae": 0.05, "bbsd": 0.05, "hidden": 0.05}
    )
    with pytest.raises(ValueError, match="no test"):
        alpha_levels({"uae": (), "bbsd": ()}, 0.05)
