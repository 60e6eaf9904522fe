"""A monitor run from names to verdict: used by `cvops monitor` and the monitor flow."""

from __future__ import annotations

import logging

from cvops.monitor.causes import CAUSE_ALPHA
from cvops.monitor.check import (
    DriftCheck,
    add_thumbnails,
    check_drift,
    explain_check,
    live_accuracy,
    load_reference,
    load_reference_extras,
    recent_window,
    save_check,
)
from cvops.records.schema import make_engine, upgrade_schema
from cvops.storage import CentralStorage

log = logging.getLogger(__name__)


def run_monitor(
    storage: CentralStorage,
    metadata_file: str,
    db_url: str,
    *,
    last_days: float = 7,
    last_n: int = 500,
    alpha: float = 0.05,
    cause_alpha: float = CAUSE_ALPHA,
    seed: int = 0,
) -> DriftCheck:
    meta = storage.load_metadata(metadata_file)
    engine = make_engine(db_url)
    try:
        upgrade_schema(engine)  # a database last written by an older service
        window = recent_window(engine, meta.model_name, last_days, last_n)
        reference = load_reference(storage, meta)
        check = check_drift(reference, window, meta, alpha=alpha, seed=seed)
        if window.size >= 2:
            extras = load_reference_extras(storage, meta)
            explain_check(check, reference, extras, meta.classes, alpha=cause_alpha, seed=seed)
            assert check.causes is not None
            add_thumbnails(engine, check.causes, storage)
            log.info("Likely cause: %s", check.causes.sentence)
        check.labelled, check.live_accuracy = live_accuracy(engine, window)
        check.test_accuracy = meta.metrics.get("test_accuracy")
        save_check(engine, check)
    finally:
        engine.dispose()
    if check.drifted:
        drifted = check.drifting_tests
        log.warning(
            "DRIFT DETECTED for %s v%s over %d predictions: %s",
            meta.model_name,
            meta.version,
            window.size,
            ", ".join(drifted),
        )
    else:
        log.info("No drift for %s over %d predictions", meta.model_name, window.size)
    return check
