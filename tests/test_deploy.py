"""Promotion gate and registry alias rotation (embedded SQLite MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cvops import deploy


@pytest.mark.parametrize(
    ("new", "champion", "promote"),
    [(0.90, None, True), (0.90, 0.905, True), (0.90, 0.92, False), (0.95, 0.90, True)],
)
def test_decide_promotion(new: float, champion: float | None, promote: bool) -> None:
    decision = deploy.decide_promotion(new, champion, 0.01, "accuracy")
    assert decision.promote is promote
    assert ("below the champion" in decision.reason) is (not promote)


@pytest.fixture()
def client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("m")
    for _ in range(3):
        c.create_model_version("m", source=str(tmp_path))
    return c


def test_promote_keeps_previous_and_rollback_swaps(client: MlflowClient) -> None:
    assert deploy.champion_version(client, "m") is None
    assert deploy.promote(client, "m", "1") is None
    assert deploy.promote(client, "m", "2") == "1"
    assert deploy.champion_version(client, "m") == "2"
    assert deploy.champion_version(client, "m", deploy.PREVIOUS) == "1"
    assert deploy.promote(client, "m", "2") == "2"  # idempotent
    assert deploy.champion_version(client, "m", deploy.PREVIOUS) == "1"
    assert deploy.rollback_aliases(client, "m") == ("1", "2")
    assert deploy.champion_version(client, "m") == "1"


def test_rollback_without_previous_is_a_clear_error(client: MlflowClient) -> None:
    deploy.promote(client, "m", "1")
    with pytest.raises(RuntimeError, match="nothing to roll back"):
        deploy.rollback_aliases(client, "m")


def test_monitor_env_keeps_database_passwords_out_of_job_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job variables live in Prefect's database and UI: the URL loses its password, a 0600
    libpq password file (escaped per libpq's rules) gets it, and a new password replaces the
    old line instead of adding one."""
    from types import SimpleNamespace

    settings = SimpleNamespace(
        state_dir=tmp_path / "state",
        central_storage_path=tmp_path / "cs",
        mlflow_tracking_uri="http://127.0.0.1:5050",
    )
    url = "postgresql+psycopg://cvops:p%3Aw%5Cd@127.0.0.1:5433/cvops_service"
    monkeypatch.setenv("CVOPS_SERVICE_DB_URL", url)
    env = deploy.monitor_env(settings)
    assert env["CVOPS_SERVICE_DB_URL"] == "postgresql+psycopg://cvops@127.0.0.1:5433/cvops_service"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5050"
    passfile = Path(env["PGPASSFILE"])
    assert passfile == (tmp_path / "state" / deploy.PGPASS_FILE).resolve()
    assert passfile.stat().st_mode & 0o777 == 0o600
    assert passfile.read_text() == "127.0.0.1:5433:cvops_service:cvops:p\\:w\\\\d\n"
    assert "p:w" not in repr(env)

    monkeypatch.setenv("CVOPS_SERVICE_DB_URL", url.replace("p%3Aw%5Cd", "new"))
    deploy.monitor_env(settings)
    assert passfile.read_text() == "127.0.0.1:5433:cvops_service:cvops:new\n"

    monkeypatch.setenv("CVOPS_SERVICE_DB_URL", f"sqlite:///{tmp_path / 'service.db'}")
    plain = deploy.monitor_env(settings)
    assert "PGPASSFILE" not in plain
    assert plain["CVOPS_SERVICE_DB_URL"] == f"sqlite:///{tmp_path / 'service.db'}"
