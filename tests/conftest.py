"""Test-wide setup: every test run keeps its state (Prefect, MLflow) in a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="cvops-test-state-"))
os.environ["CVOPS_STATE_DIR"] = str(_STATE)
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Embedded mode would leave a background service and scheduler running: tests opt in.
os.environ["CVOPS_BACKGROUND"] = "false"

from cvops.runtime import bootstrap_env  # noqa: E402

bootstrap_env()

from tests.label_studio import label_studio  # noqa: E402, F401 (session fixture)
