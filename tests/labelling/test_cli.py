"""`cvops label`: configuration errors are one message naming what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cvops.cli import app

CONFIG = {
    "flow_module": "cvops.flows.full_flow",
    "model": {"model_name": "m", "input_size": {"w": 8, "h": 8}, "classes": ["a", "b"]},
}


@pytest.fixture()
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CVOPS_LABEL_STUDIO_URL", "LABEL_STUDIO_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env, no stack here
    monkeypatch.setenv("CVOPS_USE_STACK", "0")
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_push_without_label_studio_names_the_variable(config: Path) -> None:
    result = CliRunner().invoke(app, ["label", "push", "--config", str(config)])
    assert result.exit_code == 1
    assert "CVOPS_LABEL_STUDIO_URL" in result.output


def test_bad_override_names_the_field(config: Path) -> None:
    result = CliRunner().invoke(
        app, ["label", "push", "--config", str(config), "--strategy", "best"]
    )
    assert result.exit_code == 2 and "strategy" in result.output


def test_pull_needs_the_dataset_section(config: Path) -> None:
    result = CliRunner().invoke(app, ["label", "pull", "--config", str(config)])
    assert result.exit_code == 1 and "dataset" in result.output
