"""Data validation before training: one self-contained HTML report and fail-fast gates.

Checks the train and test splits of an image-folder dataset: class balance, label shift,
image property drift (size, brightness, contrast, sharpness, colour), exact and near
duplicates within and across splits (train/test leakage), corrupt files and odd images.

Why our own module: Deepchecks' vision suite pulls a 6.4 GB CUDA PyTorch and old pins, and
cleanvision crashes on corrupt files and has no train-vs-test notion; Pillow, numpy, scipy,
imagehash and OpenCV, already installed, cover what we need.

    result = validate_dataset(path, classes=cfg.model.classes, gates=cfg.train.validation)
    write_html_report(result, "report.html")
    if result.gate_failures:
        raise DataValidationError.from_result(result)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvops.data.validation.checks import (
        DataValidationError,
        GateResult,
        Issue,
        PropertyStats,
        ValidationResult,
        failure_message,
        validate_dataset,
    )
    from cvops.data.validation.report import render_html, write_html_report

# Lazy: the worker processes import features.py through this package and must not pay for
# pandas/scipy.stats/pydantic at start-up.
_EXPORTS = {
    "DataValidationError": "checks",
    "GateResult": "checks",
    "Issue": "checks",
    "PropertyStats": "checks",
    "ValidationResult": "checks",
    "failure_message": "checks",
    "validate_dataset": "checks",
    "render_html": "report",
    "write_html_report": "report",
}
__all__ = [
    "DataValidationError",
    "GateResult",
    "Issue",
    "PropertyStats",
    "ValidationResult",
    "failure_message",
    "render_html",
    "validate_dataset",
    "write_html_report",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
