"""One drift check: recent predictions vs the model's reference data, stored as rows.

Predictions are read newest first with a row limit and streamed in chunks, so memory is bounded
by `last_n` whatever the table size.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import math
import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image
from sqlalchemy import select
from sqlalchemy.engine import Engine

from cvops.data.properties import IMAGE_PROPERTIES, REFERENCE_PREFIX, reference_properties
from cvops.monitor.causes import CAUSE_ALPHA, CauseReport, explain_drift, top_examples
from cvops.monitor.stats import (
    DEFAULT_METHODS,
    REPORTED_METHODS,
    DriftResult,
    DriftTester,
    looks_like_probabilities,
)
from cvops.records.images import IMAGE_KEY, OVERLAY_KEY
from cvops.records.schema import DriftCause, DriftReport, Feedback, Prediction, upgrade_schema
from cvops.storage import CentralStorage, ModelMetadata

log = logging.getLogger(__name__)

# uae: untrained autoencoder; bbsd: the classifier's softmax; hidden: its pooled conv features
# (optional: packages and prediction rows from before it existed have none).
EMBEDDINGS = ("uae", "bbsd", "hidden")


@dataclass
class Window:
    uae: np.ndarray
    bbsd: np.ndarray
    start: dt.datetime | None
    end: dt.datetime | None
    ids: list[str] = field(default_factory=list)
    predicted: list[str | None] = field(default_factory=list)
    hidden: np.ndarray | None = None  # rows that carry hidden features (may be fewer)
    props: list[dict[str, float] | None] = field(default_factory=list)  # image properties

    def properties(self) -> pd.DataFrame | None:
        """One row per window row (NaN where a row has no properties); None when none has."""
        if not any(self.props):
            return None
        return pd.DataFrame([p or {} for p in self.props], columns=list(IMAGE_PROPERTIES))

    @property
    def size(self) -> int:
        return len(self.uae)

    def features(self, embedding: str) -> np.ndarray | None:
        return {"uae": self.uae, "bbsd": self.bbsd, "hidden": self.hidden}[embedding]


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
    causes: CauseReport | None = None

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
    """Reference features per embedding; `hidden` only when the package has them."""
    path = storage.local_copy(meta.reference_data_path, meta.sha256.get("reference_data_path"))
    present = set(pq.read_schema(path).names)
    columns = [f"{e}_feats" for e in EMBEDDINGS if f"{e}_feats" in present]
    table = pq.read_table(path, columns=columns)
    return {
        c.removesuffix("_feats"): np.asarray(table.column(c).to_pylist(), dtype=np.float64)
        for c in columns
    }


@dataclass
class ReferenceExtras:
    """What the reference parquet holds besides embeddings: labels and, for packages made
    since they were recorded, the images' properties."""

    labels: list[str] | None
    properties: pd.DataFrame | None


def load_reference_extras(storage: CentralStorage, meta: ModelMetadata) -> ReferenceExtras:
    path = storage.local_copy(meta.reference_data_path, meta.sha256.get("reference_data_path"))
    present = pq.read_schema(path).names
    props = reference_properties(present)
    columns = (["label"] if "label" in present else []) + [REFERENCE_PREFIX + p for p in props]
    frame = pq.read_table(path, columns=columns).to_pandas() if columns else pd.DataFrame()
    labels = frame["label"].astype(str).tolist() if "label" in frame else None
    properties = None
    if props:
        properties = frame[[REFERENCE_PREFIX + p for p in props]]
        properties.columns = props
    return ReferenceExtras(labels, properties)


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
            Prediction.hidden_feats,
            Prediction.created_on,
            Prediction.prediction_json,
            Prediction.image_props,
        )
        .where(Prediction.model_name == model_name, Prediction.created_on >= since)
        .order_by(Prediction.created_on.desc())
        .limit(last_n)
        .execution_options(yield_per=chunk)
    )
    uae, bbsd, hidden, times, ids, predicted, props = [], [], [], [], [], [], []
    with engine.connect() as conn:
        for row in conn.execute(stmt):
            uae.append(row.uae_feats)
            bbsd.append(row.bbsd_feats)
            if row.hidden_feats is not None:
                hidden.append(row.hidden_feats)
            times.append(row.created_on)
            ids.append(row.id)
            predicted.append((row.prediction_json or {}).get("predicted_class"))
            props.append(row.image_props)
    return Window(
        np.asarray(uae, dtype=np.float64),
        np.asarray(bbsd, dtype=np.float64),
        min(times) if times else None,
        max(times) if times else None,
        ids,
        predicted,
        np.asarray(hidden, dtype=np.float64) if hidden else None,
        props,
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


def _testable(reference: dict[str, np.ndarray], window: Window) -> list[str]:
    """Embeddings both sides have, with matching dimensions and >= 2 window rows: `hidden` is
    missing for packages and prediction rows from before it existed."""
    found = []
    for embedding in EMBEDDINGS:
        ref, current = reference.get(embedding), window.features(embedding)
        if ref is None or current is None or len(current) < 2:
            continue
        if current.shape[1] != ref.shape[1]:
            log.warning(
                "%s features: window has %d dims, reference %d; not tested",
                embedding,
                current.shape[1],
                ref.shape[1],
            )
            continue
        found.append(embedding)
    return found


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
    alarm tests (UAE-MMD, BBSD-KS with the softmax entropy, and the domain classifier on the
    hidden features when both sides have them) were chosen in benchmarks/results/; an
    embedding missing on either side drops out and the others share alpha. Reported-only
    tests run at the same level."""
    methods = methods or REPORTED_METHODS
    embeddings = [e for e in _testable(reference, window) if methods.get(e)]
    alarm_methods = {e: m for e, m in (alarm_methods or DEFAULT_METHODS).items() if e in embeddings}
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
    levels = alpha_levels(alarm_methods, alpha)
    permutations = max(100, math.ceil(2 / min(levels.values())))
    for embedding in embeddings:
        current = window.features(embedding)
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


def explain_check(
    check: DriftCheck,
    reference: dict[str, np.ndarray],
    extras: ReferenceExtras,
    classes: list[str],
    *,
    alpha: float = CAUSE_ALPHA,
    examples: int = 8,
    seed: int = 0,
) -> CauseReport:
    """Ranked causes of the window's difference (`cvops.monitor.causes`), and the window rows
    the domain classifier finds least like the reference on the hidden features (the alarm
    classifier's) or, without them, the UAE features."""
    window = check.window
    report = explain_drift(
        classes=classes,
        reference_properties=extras.properties,
        window_properties=window.properties(),
        reference_labels=extras.labels,
        reference_probs=reference.get("bbsd"),
        window_predicted=window.predicted,
        window_probs=window.bbsd if window.size else None,
        alpha=alpha,
    )
    embedding = "hidden" if "hidden" in check.results else "uae"
    current = window.features(embedding)
    if current is not None and len(current) == window.size and embedding in reference:
        report.examples = top_examples(
            reference[embedding],
            current,
            window.ids,
            predicted=window.predicted,
            k=examples,
            seed=seed,
        )
    check.causes = report
    return report


def thumbnail_uri(b64: str | None, side: int = 112) -> str | None:
    """A stored base64 image as a small JPEG data URI (None when absent or unreadable)."""
    if not b64:
        return None
    try:
        data = base64.b64decode(b64)
    except ValueError:
        return None
    return thumbnail_of(data, side)


def thumbnail_of(data: bytes, side: int = 112) -> str | None:
    """Image bytes as a small JPEG data URI (None when unreadable)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (side, side))
            rgb = im.convert("RGB")
    except Exception:  # noqa: BLE001 - a bad stored image loses its thumbnail, not the report
        return None
    rgb.thumbnail((side, side), Image.Resampling.BILINEAR)
    if max(rgb.size) < side // 2:  # tiny images: enlarge so they can be seen
        scale = max(1, (side // 2) // max(rgb.size))
        rgb = rgb.resize((rgb.width * scale, rgb.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def add_thumbnails(
    engine: Engine, report: CauseReport, storage: CentralStorage | None = None
) -> int:
    """Thumbnails of the examples' uploads and Grad-CAM overlays, wherever the service kept
    them (CVOPS_SERVICE_STORE_IMAGES, `cvops.records.images`): inline in the predictions row,
    else the objects the row references in central storage. Examples without an image keep
    their ids, and the report says why in a note. Returns how many examples got one."""
    examples = report.examples
    if not examples:
        return 0
    by_id = {e.prediction_id: e for e in examples}
    stmt = select(
        Prediction.id, Prediction.input_img, Prediction.overlaid_img, Prediction.prediction_json
    ).where(Prediction.id.in_(list(by_id)))
    not_stored, unread, errors = 0, 0, []
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    for row in rows:
        example = by_id[row.id]
        if row.input_img:
            example.image = thumbnail_uri(row.input_img)
            example.overlay = thumbnail_uri(row.overlaid_img)
            continue
        keys = row.prediction_json if isinstance(row.prediction_json, dict) else {}
        if not keys.get(IMAGE_KEY):
            not_stored += 1
            continue
        if storage is None:
            unread += 1
            errors.append("no central storage given to read them from")
            continue
        for attr, name in (("image", IMAGE_KEY), ("overlay", OVERLAY_KEY)):
            if not keys.get(name):
                continue
            try:
                setattr(example, attr, thumbnail_of(storage.read_bytes(keys[name])))
            except Exception as err:  # noqa: BLE001 - a missing image never fails the report
                log.warning("example image %s not read from %s: %s", keys[name], storage, err)
                errors.append(f"{keys[name]}: {type(err).__name__}")
        unread += example.image is None
    if not_stored:
        report.notes.append(
            f"{not_stored} of {len(examples)} example images were not stored (the service "
            "ran with CVOPS_SERVICE_STORE_IMAGES=none): ids only; set it to db or "
            "central_storage to see them"
        )
    if unread:
        report.notes.append(
            f"{unread} of {len(examples)} example images kept in central storage could not be "
            f"read ({errors[0] if errors else 'unreadable image'})"
        )
    return sum(e.image is not None for e in examples)


def cause_row(check: DriftCheck) -> dict[str, object] | None:
    if check.causes is None:
        return None
    return {
        "run_id": check.run_id,
        "created_on": dt.datetime.now(dt.UTC),
        "model_name": check.model_name,
        "model_version": check.model_version,
        "drifted": check.drifted,
        "sentence": check.causes.sentence,
        "top_cause": check.causes.top_cause,
        "details": check.causes.as_dict(),
    }


def stored_causes(
    engine: Engine, run_id: str | None = None, model_name: str | None = None
) -> tuple[DriftCause | None, CauseReport | None]:
    """A past run's cause row and report: the run whose id starts with `run_id`, else the
    newest (of `model_name` when given); (None, None) when there is none."""
    from sqlalchemy.orm import Session

    stmt = select(DriftCause).order_by(DriftCause.created_on.desc()).limit(1)
    if run_id:
        stmt = stmt.where(DriftCause.run_id.startswith(run_id, autoescape=True))
    if model_name:
        stmt = stmt.where(DriftCause.model_name == model_name)
    with Session(engine) as session:
        row = session.scalars(stmt).first()
        if row is None:
            return None, None
        session.expunge(row)
    return row, CauseReport.from_dict(row.details)


def save_check(engine: Engine, check: DriftCheck) -> int:
    rows = check.rows()
    cause = cause_row(check)
    if rows or cause:
        upgrade_schema(engine)
        with engine.begin() as conn:
            if rows:
                conn.execute(DriftReport.__table__.insert(), rows)  # type: ignore[attr-defined]
            if cause:
                conn.execute(DriftCause.__table__.insert(), [cause])  # type: ignore[attr-defined]
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
    if check.causes is not None:
        lines.append("  likely cause: " + check.causes.sentence)
        lines += [f"  note: {n}" for n in check.causes.notes]
    return "\n".join(lines)
