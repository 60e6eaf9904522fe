"""A real Label Studio server on loopback for the labelling tests.

Installed by the fixture itself from the package index into a cache folder
(`CVOPS_TEST_CACHE`, default ~/.cache/cvops-tests) in its own virtual environment, once per
machine; its migrated SQLite database is kept there as a template, so that only the first
session pays for Label Studio's migrations (~100 s on two busy cores, later starts ~30 s).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvops.background import free_port
from cvops.labelling.server import LABEL_STUDIO_VERSION, LabelStudioProcess, ensure_venv

log = logging.getLogger(__name__)

# A throwaway server on loopback; fixed so that the cached database template keeps working.
USER = "admin@cvops.test"
PASSWORD = "cvops-test-password"
TOKEN = "cvops0test0token0for0label0studio"
DB = "label_studio.sqlite3"


def cache_dir() -> Path:
    explicit = os.environ.get("CVOPS_TEST_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvops-tests"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioProcess]:
    cache = cache_dir()
    exe = ensure_venv(cache / f"label-studio-{LABEL_STUDIO_VERSION}")
    data = tmp_path_factory.mktemp("label-studio")
    template = cache / f"label-studio-{LABEL_STUDIO_VERSION}-{DB}"
    if template.is_file():
        shutil.copyfile(template, data / DB)
    server = LabelStudioProcess(
        exe, data, free_port(), username=USER, password=PASSWORD, token=TOKEN
    )
    seconds = server.start()
    log.info(
        "Label Studio %s healthy after %.1f s at %s", LABEL_STUDIO_VERSION, seconds, server.url
    )
    yield server
    server.stop()
    if not template.is_file() and (data / DB).is_file():
        partial = template.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(data / DB, partial)
        partial.replace(template)
