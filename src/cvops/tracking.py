"""MLflow helpers: one place that knows the store, experiments, run links and the registry."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from cvops.config import MlflowExperiment
from cvops.settings import Settings

log = logging.getLogger(__name__)


def configure(settings: Settings) -> str:
    """Point MLflow at the configured server, or at the embedded SQLite store."""
    uri = settings.resolved_tracking_uri
    if uri.startswith("sqlite:"):
        settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(exp: MlflowExperiment, settings: Settings) -> str:
    """Create the experiment once (artifacts under the project on embedded defaults)."""
    client = MlflowClient()
    existing = client.get_experiment_by_name(exp.exp_name)
    if existing is not None:
        return existing.experiment_id
    tags = {**exp.exp_tags, "mlflow.note.content": exp.exp_desc}
    root = settings.mlflow_artifact_root
    location = f"{root}/{re.sub(r'[^A-Za-z0-9._-]+', '_', exp.exp_name)}" if root else None
    return client.create_experiment(exp.exp_name, artifact_location=location, tags=tags)


def git_sha(path: Path | None = None) -> str | None:
    """The project's commit, so a run can be traced back to the code that produced it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path or Path.cwd(),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def run_link(run_id: str, settings: Settings) -> str:
    """Where a person opens the run: the server's URL, or the command that starts the UI."""
    run = MlflowClient().get_run(run_id)
    path = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
    uri = settings.resolved_tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return (
        f"mlflow ui --backend-store-uri {uri} --port 5050  then open http://127.0.0.1:5050/{path}"
    )


def flat_params(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """Nested config -> `prefix.key` params (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat_params(name, value))
        else:
            out[name] = value
    return out
