"""One drift check: recent predictions vs the model's reference data, stored as rows.

Predictions are read newest first with a row limit and streamed in chunks, so memory is bounded
by `last_n` whatever the table size.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.engine import Engine

from cvops.monitor.stats import (
    DEFAULT_METHODS,
    REPORTED_METHODS,
    DriftResult,
    DriftTester,
    looks_like_probabilities,
)
from cvops.service.db import DriftReport, Feedback, Prediction, upgrade_schema
from cvops.storage import CentralStorage, ModelMetadata

log = logging.getLogger(__name__)

EMBEDDINGS = ("uae", "bbsd")


@dataclass
class Window:
    uae: np.ndarray
    bbsd: np.ndarray
    start: dt.datetime | None
    end: dt.datetime | None
    ids: list[str] = field(default_factory=list)
    predicted: list[str | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.uae)


@dataclass
class DriftCheck:
    run_id: str
    model_name: str
    model_version: str | None
    window: Window
    reference_size: int
    results: dict[str, list[DriftResult]] = field(default_factory=dict)
    alarm_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    labelled: int = 0
    live_accuracy: float | None = None
    test_accuracy: float | None = None

    @property
    def drifting_tests(self) -> list[str]:
        """Alarm tests that fired; the other reported tests inform but do not decide."""
        return [
            f"{e}/{r.method}"
            for e, rs in self.results.items()
            for r in rs
            if r.drifted and r.method in self.alarm_methods.get(e, ())
        ]

    @property
    def drifted(self) -> bool:
        return bool(self.drifting_tests)

    def rows(self) -> list[dict[str, object]]:
        now = dt.datetime.now(dt.UTC)

        def row(embedding: str, method: str, **values: object) -> dict[str, object]:
            return {
                "id": str(uuid.uuid4()),
                "run_id": self.run_id,
                "created_on": now,
                "model_name": self.model_name,
                "model_version": self.model_version,
                "window_start": self.window.start,
                "window_end": self.window.end,
                "reference_size": self.reference_size,
                "embedding": embedding,
                "method": method,
                **values,
            }

        rows = [
            row(
                embedding,
                r.method,
                sample_size=r.sample_size,
                reference_size=r.reference_size,
                score=float(r.score),
                threshold=float(r.threshold),
                p_value=None if r.p_value is None or np.isnan(r.p_value) else float(r.p_value),
                drifted=bool(r.drifted),
            )
            for embedding, results in self.results.items()
            for r in results
        ]
        if self.live_accuracy is not None:
            # Informational, not part of the drift verdict: threshold = the test accuracy.
            rows.append(
                row(
                    "labels",
                    "live_accuracy",
                    sample_size=self.labelled,
                    score=self.live_accuracy,
                    threshold=self.test_accuracy,
                    p_value=None,
                    drifted=False,
                )
            )
        return rows


def load_reference(storage: CentralStorage, meta: ModelMetadata) -> dict[str, np.ndarray]:
    table = pq.read_table(
        storage.resolve(meta.reference_data_path), columns=["uae_feats", "bbsd_feats"]
    )
    return {
        "uae": np.asarray(table.column("uae_feats").to_pylist(), dtype=np.float64),
        "bbsd": np.asarray(table.column("bbsd_feats").to_pylist(), dtype=np.float64),
    }


def recent_window(
    engine: Engine, model_name: str, last_days: float, last_n: int, chunk: int = 500
) -> Window:
    """Features of at most `last_n` newest predictions of the last `last_days` days."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=last_days)
    stmt = (
        select(
            Prediction.id,
            Prediction.uae_feats,
            Prediction.bbsd_feats,
            Prediction.created_on,
            Prediction.prediction_json,
        )
        .where(Prediction.model_name == model_name, Prediction.created_on >= since)
        .order_by(Prediction.created_on.desc())
        .limit(last_n)
        .execution_options(yield_per=chunk)
    )
    uae, bbsd, times, ids, predicted = [], [], [], [], []
    with engine.connect() as conn:
        for row in conn.execute(stmt):
            uae.append(row.uae_feats)
            bbsd.append(row.bbsd_feats)
            times.append(row.created_on)
            ids.append(row.id)
            predicted.append((row.prediction_json or {}).get("predicted_class"))
    return Window(
        np.asarray(uae, dtype=np.float64),
        np.asarray(bbsd, dtype=np.float64),
        min(times) if times else None,
        max(times) if times else None,
        ids,
        predicted,
    )


def feedback_labels(engine: Engine, ids: list[str], chunk: int = 500) -> dict[str, str]:
    """Latest true label per prediction id (feedback sent twice: the last one counts)."""
    labels: dict[str, str] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), chunk):
            stmt = (
                select(Feedback.prediction_id, Feedback.label)
                .where(Feedback.prediction_id.in_(ids[start : start + chunk]))
                .order_by(Feedback.created_on)
            )
            labels.update({row.prediction_id: row.label for row in conn.execute(stmt)})
    return labels


def live_accuracy(engine: Engine, window: Window) -> tuple[int, float | None]:
    labels = feedback_labels(engine, window.ids)
    pairs = [
        (p, labels[i]) for i, p in zip(window.ids, window.predicted, strict=True) if i in labels
    ]
    if not pairs:
        return 0, None
    return len(pairs), float(np.mean([p == t for p, t in pairs]))


def alpha_levels(alarm_methods: dict[str, tuple[str, ...]], alpha: float) -> dict[str, float]:
    """Test level per embedding: Bonferroni over the alarm tests, alpha / (number of alarm
    tests), so "any alarm test fires" has a false-alarm rate <= alpha. One level per embedding
    because its tests share one tester; reported-only embeddings get the same level."""
    tests = sum(len(alarm_methods.get(e, ())) for e in EMBEDDINGS)
    if tests == 0:
        raise ValueError("alarm_methods names no test: the verdict needs at least one")
    return dict.fromkeys(EMBEDDINGS, alpha / tests)


def check_drift(
    reference: dict[str, np.ndarray],
    window: Window,
    meta: ModelMetadata,
    *,
    methods: dict[str, tuple[str, ...]] | None = None,
    alarm_methods: dict[str, tuple[str, ...]] | None = None,
    alpha: float = 0.05,
    seed: int = 0,
) -> DriftCheck:
    """Compute every reported test; the verdict comes from the alarm tests only.

    Each alarm test runs at alpha / (number of alarm tests) (Bonferroni, `alpha_levels`), so
    the run's verdict "any alarm test fires" keeps its false-alarm rate <= alpha. The default
    alarm pair (UAE-MMD, BBSD-KS with the softmax entropy) was chosen in
    benchmarks/results/drift_power.md. Reported-only tests run at the same level."""
    methods = methods or REPORTED_METHODS
    alarm_methods = alarm_methods or DEFAULT_METHODS
    levels = alpha_levels(alarm_methods, alpha)
    permutations = max(100, math.ceil(2 / min(levels.values())))
    check = DriftCheck(
        str(uuid.uuid4()),
        meta.model_name,
        meta.version,
        window,
        len(reference["uae"]),
        alarm_methods=alarm_methods,
    )
    if window.size < 2:
        log.warning("Drift check skipped: %d predictions in the window", window.size)
        return check
    for embedding in EMBEDDINGS:
        current = window.uae if embedding == "uae" else window.bbsd
        tester = DriftTester(
            reference[embedding],
            methods[embedding],
            levels[embedding],
            seed,
            n_permutations=permutations,
            distance_permutations=max(500, permutations),
            ks_entropy=embedding == "bbsd" and looks_like_probabilities(reference[embedding]),
        )
        check.results[embedding] = tester.test(current)
    return check


def save_check(engine: Engine, check: DriftCheck) -> int:
    rows = check.rows()
    if rows:
        upgrade_schema(engine)
        with engine.begin() as conn:
            conn.execute(DriftReport.__table__.insert(), rows)  # type: ignore[attr-defined]
    return len(rows)


def describe(check: DriftCheck) -> str:
    lines = [
        f"Drift check {check.run_id} for {check.model_name} v{check.model_version}: "
        f"{check.window.size} predictions vs {check.reference_size} reference rows"
    ]
    for embedding, results in check.results.items():
        for r in results:
            verdict = "DRIFT" if r.drifted else "ok"
            if r.method not in check.alarm_methods.get(embedding, ()):
                verdict += " (reported only)"
            lines.append(
                f"  {embedding:<4} {r.method:<10} score {r.score:10.4g}  threshold "
                f"{r.threshold:10.4g}  {verdict}"
            )
    if check.live_accuracy is not None:
        lines.append(
            f"  live accuracy {check.live_accuracy:.3f} on {check.labelled} labelled predictions"
            f" (test accuracy {check.test_accuracy})"
        )
    lines.append("  verdict: " + ("DRIFT DETECTED" if check.drifted else "no drift"))
    return "\n".join(lines)
