"""The deploy step's service call against a real running service."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvops import deploy
from tests.service.conftest import ServiceProcess

pytestmark = pytest.mark.slow


def test_update_service_model_against_real_service(storage_root: Path, tmp_path: Path) -> None:
    with ServiceProcess(storage_root, tmp_path, workers=2) as service:
        result = deploy.update_service_model(service.base, "shapes_b.yaml", "s3cret")
        assert result["model_version"] == "7" and result["workers"] == 2
        with pytest.raises(RuntimeError, match="HTTP 404"):
            deploy.update_service_model(service.base, "missing.yaml", "s3cret")
        with pytest.raises(RuntimeError, match="HTTP 401"):
            deploy.update_service_model(service.base, "shapes_a.yaml", "wrong")
