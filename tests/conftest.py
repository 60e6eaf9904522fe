"""Test-wide setup: every test run keeps its state (Prefect, MLflow) in a temporary folder."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# The suite starts hundreds of Python processes (CLI runs, service workers, flows, kernels)
# that import TensorFlow, Keras, MLflow and Prefect. Where PYTHONDONTWRITEBYTECODE is set (as
# container images often do) and the venv holds no bytecode (uv installs none), every one of
# them compiles those packages from source again: ~25 s of CPU instead of ~11 s per process.
# The tests write the bytecode caches once and every later process reads them.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

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

# Parallel runs (`make test`: pytest-xdist, `--dist loadfile`). Each test file is one unit of
# work, so its module fixtures (a trained model, a started stack) are built once, on one
# worker. Files that use the suite's Label Studio server (a session fixture: ~30 s and 1 GB to
# start) are one unit, so that it starts once; a file that uses it and is not listed here still
# passes, it only starts a second one on the other worker. (xdist's own `loadgroup` marks do
# not group on pytest 9: it rewrites an attribute that pytest no longer reads.) The longest
# files go first (measured: seconds per file on 2 busy cores, `-n 2`), then the other files
# holding slow tests, so that the long units start early and the many short ones fill in at
# the end instead of one worker finishing a 7-minute test alone.
LABEL_STUDIO_FILES = ("tests/labelling/test_loop.py", "tests/e2e/test_labelling_loop.py")
LONGEST_FIRST = (
    "tests/e2e/test_stack.py",  # 530 s
    "tests/storage/test_s3_flow.py",  # 450 s
    "tests/e2e/test_embedded_background.py",  # 420 s
    "tests/model/test_gradcam.py",  # 275 s
    "tests/e2e/test_labelling_loop.py",  # 200 s, with Label Studio
    "tests/e2e/test_full_flow.py",  # 170 s
    "tests/e2e/test_prefect_monitoring.py",  # 150 s
    "tests/model/test_training_defaults.py",  # 130 s
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "label_studio" if file in LABEL_STUDIO_FILES else file

    return FileScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker: collection order
        return

    def file(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    slow_files = {file(item) for item in items if item.get_closest_marker("slow")}
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(file(item), len(rank)), file(item) not in slow_files))
