"""Evidently layer: report/tests mirror our calibrated verdicts, workspace project + dashboard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("evidently")

from evidently.ui.workspace import Workspace  # noqa: E402

from cvops.monitor import evidently_report as er  # noqa: E402
from cvops.monitor.check import DriftCheck, Window  # noqa: E402
from cvops.monitor.stats import DriftResult  # noqa: E402


def make_check() -> tuple[DriftCheck, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    reference = {"uae": rng.normal(size=(150, 32)), "bbsd": rng.dirichlet([1, 1, 1], 150)}
    window = Window(rng.normal(0.5, 1, (80, 32)), rng.dirichlet([1, 1, 1], 80), None, None)
    results = {
        "uae": [DriftResult("mmd", 0.05, 0.01, 0.001, True, 80, 150)],
        "bbsd": [DriftResult("ks", 0.10, 0.20, 0.5, False, 80, 150)],
    }
    return DriftCheck("0123456789ab", "modelx", "1", window, 150, results), reference


def test_snapshot_workspace_and_html(tmp_path: Path) -> None:
    check, reference = make_check()
    snapshot = er.build_snapshot(check, reference, classes=["a", "b", "c"])

    tests = {
        (t["metric_config"]["params"]["embedding"], t["metric_config"]["params"]["method"]): t
        for t in snapshot.dict()["tests"]
        if t["metric_config"]["params"]["type"] == er.METRIC_TYPE
    }
    assert set(tests) == {("uae", "mmd"), ("bbsd", "ks")}
    assert tests[("uae", "mmd")]["status"].value == "FAIL"  # our verdict: drifted
    assert tests[("bbsd", "ks")]["status"].value == "SUCCESS"  # our verdict: no drift

    assert len(snapshot.dict()["metrics"]) == 2 + 2 * 4 + 3  # Evidently MMD, ours, ValueDrift

    ws_dir = tmp_path / "ws"
    ids = [er.save_to_workspace(snapshot, ws_dir, "drift-modelx") for _ in range(2)]
    assert ids[0] != ids[1]
    ws = Workspace(str(ws_dir))
    projects = ws.search_project("drift-modelx")
    assert len(projects) == 1
    assert len(ws.list_runs(projects[0].id)) == 2
    assert ws.get_run(projects[0].id, ids[1]) is not None  # stored run loads back
    titles = [p.title for p in projects[0].dashboard.model().panels]
    assert "uae mmd: score vs calibrated threshold" in titles
    assert "bbsd ks: score vs calibrated threshold" in titles
    assert len(titles) == len(set(titles)) == 4  # panels not duplicated by the second save

    html = er.write_html(snapshot, tmp_path / "report" / "drift.html")
    assert html.exists()
    assert "modelx" in html.read_text(encoding="utf-8")
