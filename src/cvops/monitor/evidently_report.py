"""Evidently layer of a drift check: report + tests, workspace project with a dashboard, HTML.

The verdicts come from our calibrated tests (`cvops.monitor.stats`); Evidently shows them next to
its own scores, keeps them over time in a workspace and draws the dashboard. Everything uses the
current API (`evidently.Report`, `evidently.metrics`, `evidently.ui.workspace.Workspace`,
`evidently.sdk.panels`). `evidently.metrics.EmbeddingsDrift` is the current wrapper around the
legacy embedding-drift code and returns only a score (no verdict), which is all we take from it.

Our calibrated results enter the report as a small custom metric, `CalibratedDrift`, whose value
is read from an additional dataset of the run (so the metric's parameters are just
embedding/method/quantity and each forms one series over time on the dashboard). The score metric
carries the test "score <= calibrated threshold"; its pass/fail mirrors our verdict.
"""

from __future__ import annotations

import datetime as dt
import logging
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.core.metric_types import SingleValue, SingleValueCalculation, SingleValueMetric
from evidently.core.report import Context, Snapshot
from evidently.metrics import EmbeddingsDrift, ValueDrift
from evidently.metrics.embeddings import MMDDriftMethod
from evidently.sdk.models import PanelMetric
from evidently.sdk.panels import counter_panel, line_plot_panel
from evidently.tests import lte
from evidently.ui.workspace import Workspace

from cvops.monitor.cause_view import cause_html
from cvops.monitor.causes import CauseReport
from cvops.monitor.check import DriftCheck

log = logging.getLogger(__name__)

# Evidently's own MMD and per-column views cover uae and bbsd, which every window row has; our
# calibrated results (all embeddings, hidden included) enter as CalibratedDrift metrics.
EVIDENTLY_EMBEDDINGS = ("uae", "bbsd")
CALIBRATED = "calibrated"  # name of the additional dataset holding our results
METRIC_TYPE = "evidently:metric_v2:CalibratedDrift"
EVIDENTLY_MMD_TYPE = "evidently:metric_v2:EmbeddingsDrift"
DASHBOARD_TAB = "Drift"
PROPERTY_EMBEDDING = "property"  # CalibratedDrift rows of the image-property tests
TOP_PROPERTIES = 3  # properties per run that get a metric (and a dashboard panel when new)


class CalibratedDrift(SingleValueMetric):
    """One quantity (score, threshold, p_value or drifted 0/1) of one of our calibrated tests."""

    embedding: str
    method: str
    quantity: str = "score"


class CalibratedDriftCalculation(SingleValueCalculation[CalibratedDrift]):
    def calculate(
        self, context: Context, current_data: Dataset, reference_data: Dataset | None
    ) -> SingleValue:
        data = context.additional_data.get(CALIBRATED)
        if data is None:
            raise ValueError(f"CalibratedDrift needs the additional dataset {CALIBRATED!r}")
        df = data.as_dataframe()
        m = self.metric
        row = df[(df["embedding"] == m.embedding) & (df["method"] == m.method)]
        if row.empty:
            raise ValueError(f"No calibrated result for {m.embedding}/{m.method}")
        return self.result(float(row.iloc[0][m.quantity]))

    def display_name(self) -> str:
        m = self.metric
        return f"Calibrated {m.method} drift {m.quantity}: {m.embedding}"


def _frame(features: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(
        {f"{e}_{i}": x[:, i] for e, x in features.items() for i in range(x.shape[1])}
    )


def _results_frame(check: DriftCheck) -> pd.DataFrame:
    rows = [
        {
            "embedding": embedding,
            "method": r.method,
            "score": float(r.score),
            "threshold": float(r.threshold),
            "p_value": float(r.p_value),
            "drifted": float(bool(r.drifted)),
        }
        for embedding, results in check.results.items()
        for r in results
    ]
    if check.causes is not None:
        rows += [
            {
                "embedding": PROPERTY_EMBEDDING,
                "method": p.name,
                "score": p.statistic,
                "threshold": p.threshold,
                "p_value": p.p_adjusted,
                "drifted": float(p.significant),
            }
            for p in check.causes.properties
        ]
    columns = ["embedding", "method", "score", "threshold", "p_value", "drifted"]
    return pd.DataFrame(rows, columns=columns)


def build_snapshot(
    check: DriftCheck,
    reference: dict[str, np.ndarray],
    *,
    classes: list[str] | None = None,
    max_reference: int = 2000,
    max_columns: int = 10,
    evidently_mmd: bool = True,
    seed: int = 0,
) -> Snapshot:
    """Run the Evidently report for one drift check.

    Contents: per embedding, Evidently's MMD embedding-drift score (current `EmbeddingsDrift`;
    the reference is subsampled to `max_reference` rows because it builds a full kernel matrix);
    per (embedding, method) our calibrated score (with the test "score <= threshold"), threshold,
    p-value and verdict; `ValueDrift` for up to `max_columns` BBSD class-probability columns.
    """
    window = check.window
    names = EVIDENTLY_EMBEDDINGS
    ref_feats = {e: np.asarray(reference[e]) for e in names}
    n_ref = len(ref_feats["uae"])
    if n_ref > max_reference:
        idx = np.random.default_rng(seed).choice(n_ref, max_reference, replace=False)
        ref_feats = {e: x[idx] for e, x in ref_feats.items()}
    k = ref_feats["bbsd"].shape[1]
    cols = {e: [f"{e}_{i}" for i in range(x.shape[1])] for e, x in ref_feats.items()}
    definition = DataDefinition(
        numerical_columns=[c for e in names for c in cols[e]], embeddings=cols
    )
    current = Dataset.from_pandas(
        _frame({e: window.features(e) for e in names}), data_definition=definition
    )
    ref = Dataset.from_pandas(_frame(ref_feats), data_definition=definition)
    calibrated = Dataset.from_pandas(
        _results_frame(check),
        data_definition=DataDefinition(
            categorical_columns=["embedding", "method"],
            numerical_columns=["score", "threshold", "p_value", "drifted"],
        ),
    )

    metrics: list[Any] = []
    if evidently_mmd and window.size >= 2:
        metrics += [
            EmbeddingsDrift(embeddings_name=e, drift_method=MMDDriftMethod()) for e in names
        ]
    for embedding, results in check.results.items():
        for r in results:
            metrics.append(
                CalibratedDrift(
                    embedding=embedding,
                    method=r.method,
                    quantity="score",
                    tests=[lte(float(r.threshold))],
                )
            )
            for quantity in ("threshold", "p_value", "drifted"):
                metrics.append(
                    CalibratedDrift(embedding=embedding, method=r.method, quantity=quantity)
                )
    if check.causes is not None:  # the top-ranked properties: a series (and panel) each
        for p in check.causes.properties[:TOP_PROPERTIES]:
            metrics.append(
                CalibratedDrift(
                    embedding=PROPERTY_EMBEDDING,
                    method=p.name,
                    quantity="score",
                    tests=[lte(float(p.threshold))],
                )
            )
            for quantity in ("threshold", "p_value", "drifted"):
                metrics.append(
                    CalibratedDrift(embedding=PROPERTY_EMBEDDING, method=p.name, quantity=quantity)
                )
    if window.size >= 2:
        metrics += [ValueDrift(column=f"bbsd_{i}") for i in range(min(k, max_columns))]

    metadata: dict[str, Any] = {
        "model_name": check.model_name,
        "model_version": str(check.model_version),
        "run_id": check.run_id,
        "sample_size": str(window.size),
        "reference_size": str(check.reference_size),
        "drifted": str(check.drifted),
        "window_start": str(window.start),
        "window_end": str(window.end),
    }
    if check.causes is not None:
        metadata["likely_cause"] = check.causes.sentence
    if classes:
        metadata["bbsd_columns"] = ", ".join(f"bbsd_{i}={c}" for i, c in enumerate(classes))
    report = Report(metrics, metadata=metadata, tags=[check.model_name])
    timestamp = window.end or dt.datetime.now(dt.UTC)
    return report.run(
        current,
        ref,
        additional_data={CALIBRATED: calibrated},
        timestamp=timestamp.astimezone(dt.UTC).replace(tzinfo=None)
        if timestamp.tzinfo
        else timestamp,
        name=f"{check.model_name} v{check.model_version} drift {check.run_id[:8]}",
    )


def _panels(check_methods: list[tuple[str, str]]) -> list[Any]:
    panels: list[Any] = [
        counter_panel(
            "Calibrated tests alarming (last run)",
            [
                PanelMetric(
                    legend=f"{e} {m}",
                    metric=METRIC_TYPE,
                    metric_labels={"embedding": e, "method": m, "quantity": "drifted"},
                )
                for e, m in check_methods
                if e != PROPERTY_EMBEDDING
            ],
            aggregation="sum",
            size="full",
        )
    ]
    for e, m in check_methods:
        panels.append(
            line_plot_panel(
                f"image {m}: KS distance vs threshold"
                if e == PROPERTY_EMBEDDING
                else f"{e} {m}: score vs calibrated threshold",
                [
                    PanelMetric(
                        legend=q,
                        metric=METRIC_TYPE,
                        metric_labels={"embedding": e, "method": m, "quantity": q},
                    )
                    for q in ("score", "threshold")
                ],
                description="drift when score > threshold",
                size="half",
            )
        )
    panels.append(
        line_plot_panel(
            "Evidently MMD embedding drift score (uncalibrated)",
            [
                PanelMetric(
                    legend=e, metric=EVIDENTLY_MMD_TYPE, metric_labels={"embeddings_name": e}
                )
                for e in EVIDENTLY_EMBEDDINGS
            ],
            size="full",
        )
    )
    return panels


def _methods(snapshot: Snapshot) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for metric in snapshot.report.metrics:
        if isinstance(metric, CalibratedDrift) and (metric.embedding, metric.method) not in seen:
            seen.append((metric.embedding, metric.method))
    return seen


def save_to_workspace(snapshot: Snapshot, workspace_dir: Path, project_name: str) -> str:
    """Add the run to the project `project_name` of a local file workspace (created with its
    dashboard on first use; panels for (embedding, method) pairs not seen before are added).
    Returns the snapshot id."""
    workspace_dir = Path(workspace_dir)
    workspace_dir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(str(workspace_dir))
    found = ws.search_project(project_name)
    project = found[0] if found else ws.create_project(project_name, "cvops drift monitoring")
    if len(found) > 1:
        log.warning(
            "%d Evidently projects named %r; using %s", len(found), project_name, project.id
        )
    existing = {p.title for p in project.dashboard.model().panels}
    for panel in _panels(_methods(snapshot)):
        if panel.title not in existing:
            project.dashboard.add_panel(panel, tab=DASHBOARD_TAB)
    ref = ws.add_run(project.id, snapshot, include_data=False)
    return str(ref.id)


def write_html(snapshot: Snapshot, path: Path, causes: CauseReport | None = None) -> Path:
    """Standalone HTML of the report, headed by the run name (model, version, run id) and,
    when given, the run's causes (plain HTML with inline images, readable without the
    Evidently UI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html = snapshot.get_html_str(as_iframe=False)
    title = escape(snapshot.get_name() or "Drift report")
    header = f'<h2 style="font-family: sans-serif; margin: 16px">{title}</h2>'
    if causes is not None:
        header += "\n" + cause_html(causes)
    html = html.replace("<body>", "<body>\n" + header, 1)
    path.write_text(html, encoding="utf-8")
    return path
