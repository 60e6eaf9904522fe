"""Prometheus metrics, per app instance; multiprocess-aware for gunicorn workers.

With `PROMETHEUS_MULTIPROC_DIR` set (by `cvops serve`), every worker writes its samples there
and `/metrics` aggregates all workers, so a scrape sees the whole service, not one worker.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
STAGES = ("preprocess", "queue", "inference", "render", "spool")


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cvops_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "cvops_request_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "cvops_predictions", "Predictions by class", ["model", "predicted_class"], registry=r
        )
        self.batch_size = Histogram(
            "cvops_batch_size",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.stage = Histogram(
            "cvops_stage_seconds",
            "Time of one /predict in each stage: preprocess (decode, resize), queue (waiting "
            "for the model), inference (its batch's model step), render (heatmap PNGs), spool "
            "(waiting for the records to be on disk)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        # looked up once: a label lookup costs what an observation does, and /predict makes five
        self.stages = {name: self.stage.labels(name) for name in STAGES}
        self.model_info = Gauge(
            "cvops_model_info",
            "Model served by each worker",
            ["model", "version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.spool_pending = Gauge(
            "cvops_spool_pending",
            "Records waiting for the prediction DB",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.dead_letters = Counter(
            "cvops_dead_letters",
            "Records the prediction DB refused, kept in dead_letters (table or file)",
            ["kind"],
            registry=r,
        )

        drift_labels = ["model", "embedding", "method"]
        self.drift_score = Gauge(
            "cvops_drift_score",
            "Latest monitor score per test",
            drift_labels,
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.drift_threshold = Gauge(
            "cvops_drift_threshold",
            "Calibrated threshold of the latest monitor run",
            drift_labels,
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.drift_detected = Gauge(
            "cvops_drift_detected",
            "1 if the latest monitor run found drift",
            drift_labels,
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.drift_property = Gauge(
            "cvops_drift_property_score",
            "Latest monitor run: KS distance of an image property's distribution from the "
            "reference (0 same, 1 disjoint; cvops.monitor.causes)",
            ["model", "property"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )

    def set_drift_causes(self, model_name: str, details: dict | None) -> None:
        """KS distance of each image property from the reference in the latest run's causes
        (`drift_causes.details`)."""
        for prop in (details or {}).get("properties", []):
            self.drift_property.labels(model_name, prop["name"]).set(prop["statistic"])

    def set_drift(self, rows: list) -> None:
        for row in rows:
            labels = (row.model_name, row.embedding, row.method)
            self.drift_score.labels(*labels).set(row.score)
            if row.threshold is not None:
                self.drift_threshold.labels(*labels).set(row.threshold)
            self.drift_detected.labels(*labels).set(1.0 if row.drifted else 0.0)

    def render(self) -> tuple[bytes, str]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
