"""`cvops rollback` end to end: registry aliases, a real service and the Prefect Variable."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from cvops import deploy
from tests.service.conftest import ServiceProcess, image_bytes, package

pytestmark = pytest.mark.slow


def test_rollback_serves_previous_champion_everywhere(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    package(root, "shapes_r", "1", seed=1)
    package(root, "shapes_r", "2", seed=2)
    assert (root / "models" / "shapes_r-v1.yaml").is_file()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("shapes_r")
    for _ in range(2):
        client.create_model_version("shapes_r", source=str(root))
    deploy.promote(client, "shapes_r", "1")
    deploy.promote(client, "shapes_r", "2")

    with ServiceProcess(root, tmp_path, model="shapes_r.yaml") as service:

        def served() -> set[str]:
            return {
                httpx.post(
                    f"{service.base}/predict", files={"file": ("x.png", image_bytes())}, timeout=30
                ).json()["model_version"]
                for _ in range(6)
            }

        assert served() == {"2"}
        summary = deploy.rollback(client, root, "shapes_r", url=service.base, token="s3cret")
        assert "v1" in summary
        assert served() == {"1"}

    assert deploy.champion_version(client, "shapes_r") == "1"
    assert deploy.champion_version(client, "shapes_r", deploy.PREVIOUS) == "2"
    from prefect.variables import Variable

    assert Variable.get(deploy.VARIABLE_METADATA_FILE) == "shapes_r-v1.yaml"
