"""The labelling tests' client of the session's Label Studio server (`tests.label_studio`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cvops.labelling.client import LabelStudio
from cvops.labelling.server import LabelStudioProcess


@pytest.fixture()
def studio(label_studio: LabelStudioProcess) -> Iterator[LabelStudio]:
    with LabelStudio(label_studio.url, label_studio.token) as client:
        yield client
