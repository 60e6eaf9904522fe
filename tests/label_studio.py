"""A real Label Studio server on loopback for the labelling tests.

Installed by the fixture itself from the package index into a cache folder
(`CVOPS_TEST_CACHE`, default ~/.cache/cvops-tests) in its own virtual environment, once per
machine; its migrated SQLite database is kept there as a template, so that only the first
session pays for Label Studio's migrations (~100 s on two busy cores, later starts ~30 s).
The template is copied as soon as the server is healthy, before any test adds a project: a
copy taken after the tests carried their projects and tasks into every later session.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
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
TEMPLATE = "empty-" + DB  # another name than the one that held tests' projects


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
    template = cache / f"label-studio-{LABEL_STUDIO_VERSION}-{TEMPLATE}"
    if template.is_file():
        shutil.copyfile(template, data / DB)
    server = LabelStudioProcess(
        exe, data, free_port(), username=USER, password=PASSWORD, token=TOKEN
    )
    seconds = server.start()
    log.info(
        "Label Studio %s healthy after %.1f s at %s", LABEL_STUDIO_VERSION, seconds, server.url
    )
    if not template.is_file():
        save_template(data / DB, template)
    yield server
    server.stop()


def save_template(live: Path, template: Path) -> None:
    """A consistent copy of the running server's database (SQLite's backup API), written under
    another name and renamed, so that a concurrent session never reads half a file."""
    partial = template.with_suffix(f".{os.getpid()}.tmp")
    with closing(sqlite3.connect(live)) as source, closing(sqlite3.connect(partial)) as copy:
        source.backup(copy)
    partial.replace(template)
