"""`labelling.push_on_drift`: with `monitor.retrain_on_drift`, drift sends images to Label
Studio instead of retraining on the old data; a failure is reported, never raised."""

from __future__ import annotations

from typing import Any

import pytest

from cvops.flows import full_flow, monitor_flow
from cvops.labelling import commands
from cvops.labelling.loop import PushResult

CONFIG: dict[str, Any] = {
    "flow_module": "cvops.flows.full_flow",
    "model": {"model_name": "m", "input_size": {"w": 8, "h": 8}, "classes": ["a", "b"]},
    "monitor": {"retrain_on_drift": True},
    "labelling": {"push_on_drift": True, "n": 30},
}


def test_drift_pushes_instead_of_retraining(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_push(cfg, labelling):  # noqa: ANN001, ANN202
        calls.append((cfg.model.model_name, labelling.n))
        return None, PushResult(3, 30, {"entropy": 27, "random": 3}, 90, 0, "entropy")

    monkeypatch.setattr(commands, "run_push", fake_push)
    monkeypatch.setattr(full_flow, "start", lambda config: pytest.fail("must not retrain"))
    outcome = monitor_flow.retrain(CONFIG)
    assert calls == [("m", 30)]
    assert outcome.startswith("label push: sent 30 of 90")


def test_push_failure_is_an_action_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CVOPS_LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.chdir("/")  # no .env here
    outcome = monitor_flow.retrain(CONFIG)
    assert outcome.startswith("label push failed") and "CVOPS_LABEL_STUDIO_URL" in outcome


def test_without_the_flag_drift_retrains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(full_flow, "start", lambda config: {"deploy": "v2 is champion"})
    config = {**CONFIG, "labelling": {"push_on_drift": False}}
    assert monitor_flow.retrain(config) == "retrained: v2 is champion"
