"""`monitor.retrain_on_drift`: the deploy step's parameters carry the flow config, and a drift
verdict in the monitor flow runs the full flow with it (training itself is replaced here)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cvops import deploy
from cvops.config import MonitorConfig
from cvops.flows import full_flow
from cvops.flows.monitor_flow import drift_detection_evidently
from tests.monitor.test_check import insert, setup  # noqa: F401 (fixture)


def flow_config(metadata_file: str, workspace: str, retrain: bool) -> dict[str, Any]:
    return {
        "flow_module": "cvops.flows.full_flow",
        "model": {
            "model_name": metadata_file.removesuffix(".yaml"),
            "input_size": {"w": 50, "h": 50},
            "classes": ["a", "b", "c"],
        },
        "monitor": {"last_n": 200, "workspace": workspace, "retrain_on_drift": retrain},
    }


def deployment_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """What the deploy step stores on the deployment, as Prefect stores it (JSON)."""
    params = deploy.monitor_parameters(config, MonitorConfig.model_validate(config["monitor"]))
    return json.loads(json.dumps(params))


def test_parameters_carry_the_config_only_when_retraining(tmp_path) -> None:
    on = deployment_parameters(flow_config("m.yaml", str(tmp_path), True))
    off = deployment_parameters(flow_config("m.yaml", str(tmp_path), False))
    assert on["retrain_on_drift"] is True and on["retrain_config"]["model"]["model_name"] == "m"
    assert off["retrain_on_drift"] is False and "retrain_config" not in off
    # the flow accepts them as Prefect validates a deployment's parameters
    drift_detection_evidently.validate_parameters(on)


@pytest.mark.slow
def test_drift_with_flag_runs_full_flow_with_deployed_config(setup, monkeypatch) -> None:  # noqa: F811
    storage, metadata_file, url, engine = setup
    monkeypatch.setenv("CENTRAL_STORAGE_PATH", str(storage.root))
    monkeypatch.setenv("CVOPS_SERVICE_DB_URL", url)
    calls: list[dict[str, Any]] = []

    def fake_start(config: dict[str, Any]) -> dict[str, Any]:
        calls.append(config)
        return {"deploy": "fake model v9 is champion"}

    monkeypatch.setattr(full_flow, "start", fake_start)  # training itself is not under test
    config = flow_config(metadata_file, str(storage.root.parent / "evidently"), True)
    params = drift_detection_evidently.validate_parameters(
        {**deployment_parameters(config), "metadata_file": metadata_file}
    )

    insert(engine, 200)
    calm = drift_detection_evidently(**params)
    assert calm["drifted"] is False and calls == []

    insert(engine, 200, shift=0.6)
    alarm = drift_detection_evidently(**params)
    assert alarm["drifted"] is True
    assert calls == [config]
    assert "retrained: fake model v9 is champion" in alarm["actions"]

    off = drift_detection_evidently.validate_parameters(
        {
            **deployment_parameters(
                {**config, "monitor": {**config["monitor"], "retrain_on_drift": False}}
            ),
            "metadata_file": metadata_file,
        }
    )
    assert drift_detection_evidently(**off)["drifted"] is True and len(calls) == 1
