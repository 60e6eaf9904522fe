"""Process-wide defaults set before Prefect/TensorFlow import (env only, nothing mutable)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

DEFAULT_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # first start migrates its SQLite DB; on a busy 2-core machine that takes > 20 s
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "cvops",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


log = logging.getLogger(__name__)


def use_running_stack() -> dict[str, str]:
    """Point cvops at the stack `cvops up` runs for this state folder, if it runs.

    Only variables not already set are taken, so an explicit environment always wins;
    `CVOPS_USE_STACK=0` turns this off. Returns what was applied.
    """
    if os.environ.get("CVOPS_USE_STACK", "1") == "0":
        return {}
    from cvops.settings import Settings  # reads `.env` too, as `cvops up` did

    stack_dir = Settings().state_dir.resolve() / "stack"
    from cvops.stack.settings import read_env_file

    try:
        os.kill(int((stack_dir / "supervisord.pid").read_text().strip()), 0)
    except (OSError, ValueError):
        return {}
    values = read_env_file(stack_dir / "client.env")
    applied = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(applied)
    if applied:
        log.info(
            "Using the local stack (cvops up): MLflow %s, Prefect %s, service %s",
            values.get("MLFLOW_TRACKING_URI"),
            values.get("PREFECT_API_URL"),
            values.get("CVOPS_SERVICE_URL"),
        )
    return applied


def bootstrap_env() -> None:
    """Quiet, project-local defaults; anything the user already set wins."""
    use_running_stack()
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("PREFECT_API_URL"):
        # Embedded mode: keep Prefect's ephemeral database inside the project state folder.
        state = Path(os.environ.get("CVOPS_STATE_DIR", ".cvops")).resolve()
        os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def configure_logging(level: int = logging.INFO) -> None:
    """Our loggers at `level` whether or not Prefect configured logging first (it sets the
    root logger to WARNING and attaches its handlers to `cvops` via extra loggers)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("cvops").setLevel(level)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
