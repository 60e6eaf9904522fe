"""Shared pieces of the flow modules: config parsing and the end-of-run summary."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cvops.config import FlowConfig, parse_config
from cvops.settings import Settings
from cvops.storage import location_text


def step(name: str) -> Any:
    """A Prefect task that never caches: inputs are models and frames, not hashable values."""
    return task(name=name, cache_policy=NO_CACHE)


def as_config(config: dict[str, Any] | FlowConfig, *sections: str) -> FlowConfig:
    """Accept the reference's plain dict (or a parsed config) and check needed sections."""
    cfg = config if isinstance(config, FlowConfig) else parse_config(config)
    cfg.require(*sections)
    return cfg


def summary(results: dict[str, Any], settings: Settings) -> str:
    """Human-readable 'where are my results' lines printed at the end of a run."""
    storage = location_text(settings.central_storage_path)
    lines = ["", "Results", f"  central storage : {storage}"]
    for key, label in (
        ("metadata_path", "metadata"),
        ("model_path", "model"),
        ("uae_model_path", "UAE detector"),
        ("bbsd_model_path", "BBSD detector"),
        ("reference_data_path", "reference data"),
    ):
        if key in results:
            lines.append(f"  {label:<16}: {storage}/{results[key]}")
    for key, label in (("test_accuracy", "test accuracy"), ("test_auc", "test macro AUC")):
        if key in results:
            lines.append(f"  {label:<16}: {results[key]:.4f}")
    if "data_version" in results:
        dv = results["data_version"]
        lines.append(f"  {'data version':<16}: {dv.get('tag')} ({dv.get('dvc_hash')})")
    if "model_version" in results:
        lines.append(f"  {'registry':<16}: {results.get('model_name')} v{results['model_version']}")
    for key, label in (
        ("train_run_link", "MLflow train run"),
        ("eval_run_link", "MLflow eval run"),
    ):
        if key in results:
            lines.append(f"  {label:<16}: {results[key]}")
    if results.get("deploy"):
        lines.append(f"  {'deploy':<16}: {results['deploy']}")
    return "\n".join(lines)
