"""The labelling tests' client of the session's Label Studio server (`tests.label_studio`), and
a PostgreSQL database for the queries that differ between SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cvops.labelling.client import LabelStudio
from cvops.labelling.server import LabelStudioProcess
from tests.pg import PostgresCluster


@pytest.fixture()
def studio(label_studio: LabelStudioProcess) -> Iterator[LabelStudio]:
    with LabelStudio(label_studio.url, label_studio.token) as client:
        yield client


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster.create_database("labelling")
    finally:
        cluster.destroy()
