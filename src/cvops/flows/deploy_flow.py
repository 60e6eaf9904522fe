"""Deploy flow: promotion gate -> registry alias `champion` -> model service reload ->
Prefect Variables -> the drift-monitor deployment on a process work pool."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import keras
import mlflow.keras
from mlflow.tracking import MlflowClient
from prefect import flow

from cvops import deploy, tracking
from cvops.config import FlowConfig, MonitorConfig
from cvops.flows.common import as_config, step
from cvops.flows.eval_flow import metadata_file_name
from cvops.model.evaluate import evaluate_on_split
from cvops.service.settings import ServiceSettings
from cvops.settings import Settings, get_settings
from cvops.storage import CentralStorage, ModelMetadata, read_metadata

log = logging.getLogger(__name__)


@step("promotion-gate")
def promotion_gate(cfg: FlowConfig, storage: CentralStorage, meta: ModelMetadata) -> dict:
    """Score the new model and the current champion on the same test split."""
    assert cfg.deploy is not None
    metric = cfg.deploy.promotion.metric
    client = MlflowClient()
    champion = deploy.champion_version(client, meta.model_name)
    if champion is None or champion == meta.version:
        decision = deploy.decide_promotion(
            meta.metrics.get(f"test_{metric}", float("nan")), None, 0.0, metric
        )
    else:
        if cfg.dataset is None:
            raise ValueError("deploy: the promotion gate needs the dataset section")
        size = (meta.input_size.h, meta.input_size.w)
        subset = cfg.evaluate.subset if cfg.evaluate else "test"
        new_model = keras.models.load_model(storage.resolve(meta.model_path), compile=False)
        old_model = mlflow.keras.load_model(f"models:/{meta.model_name}@{deploy.CHAMPION}")
        scores = [
            getattr(evaluate_on_split(m, cfg.dataset.path, subset, meta.classes, size), metric)
            for m in (new_model, old_model)
        ]
        decision = deploy.decide_promotion(*scores, cfg.deploy.promotion.max_drop, metric)
    verdict = "promote" if decision.promote else "reject"
    log.info("Promotion gate: %s — %s", verdict, decision.reason)
    if meta.mlflow_run_id:
        client.set_tag(meta.mlflow_run_id, "promotion.decision", verdict)
        client.set_tag(meta.mlflow_run_id, "promotion.reason", decision.reason)
        client.set_tag(meta.mlflow_run_id, "promotion.champion_before", str(champion))
    return {"promote": decision.promote, "reason": decision.reason, "champion_before": champion}


@step("update-service")
def update_service(cfg: FlowConfig, metadata_file: str) -> str:
    assert cfg.deploy is not None
    url = deploy.service_url(cfg.deploy.service_url)
    if url is None:
        message = "no model service configured (deploy.service_url or CVOPS_SERVICE_URL)"
        log.warning("Deploy: %s; the service will load the champion when it starts", message)
        return message
    token = os.environ.get("CVOPS_SERVICE_ADMIN_TOKEN")
    result = deploy.update_service_model(url, metadata_file, token)
    served = f"{result['model_name']} v{result['model_version']}"
    return f"{url} serves {served} in {result['workers']} workers"


@step("schedule-monitoring")
def schedule_monitoring(cfg: FlowConfig, settings: Settings, monitor: MonitorConfig) -> str:
    """The monitor deployment on the Prefect server; embedded mode has none to keep it."""
    assert cfg.deploy is not None
    if not deploy.prefect_server_configured():
        message = (
            "monitoring not scheduled: no Prefect server (set PREFECT_API_URL); "
            "run `cvops monitor --config ...` on a schedule instead"
        )
        log.warning("Deploy: %s", message)
        return message
    service = ServiceSettings()
    env = {
        "CENTRAL_STORAGE_PATH": str(Path(settings.central_storage_path).resolve()),
        "CVOPS_STATE_DIR": str(Path(settings.state_dir).resolve()),
        "CVOPS_SERVICE_DB_URL": service.resolved_db_url,
    }
    if settings.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    parameters = {
        "last_days": monitor.last_days,
        "last_n": monitor.last_n,
        "evidently_project": monitor.evidently_project,
        "alpha": monitor.alpha,
        "webhook_url": monitor.webhook_url,
        "workspace": str(monitor.workspace.resolve()),
        "evidently_mmd": monitor.evidently_mmd,
    }
    name = cfg.deploy.prefect.deployment_name
    deploy.schedule_monitor(name, monitor.pool_name, monitor.cron, parameters, env, str(Path.cwd()))
    return (
        f"monitoring scheduled: {deploy.MONITOR_FLOW_NAME}/{name} on pool {monitor.pool_name}, "
        f"cron {monitor.cron!r} (start a worker: prefect worker start --pool "
        f"{monitor.pool_name} --type process)"
    )


@flow(name="deploy_flow", log_prints=True)
def deploy_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = as_config(config, "deploy")
    settings: Settings = get_settings()
    tracking.configure(settings)
    storage = CentralStorage(settings.central_storage_path)
    metadata_file = metadata_file_name(cfg)
    meta = read_metadata(storage.metadata_path(metadata_file))
    gate = promotion_gate(cfg, storage, meta)
    if not gate["promote"]:
        return {"deploy": f"not promoted: {gate['reason']}"}
    if meta.version is not None:
        deploy.promote(MlflowClient(), meta.model_name, meta.version)
    service = update_service(cfg, metadata_file)
    monitor = cfg.monitor or MonitorConfig()
    deploy.set_prefect_variables(metadata_file, monitor.pool_name)
    scheduled = schedule_monitoring(cfg, settings, monitor)
    summary = (
        f"{meta.model_name} v{meta.version} is champion; {service}; Prefect Variables "
        f"{deploy.VARIABLE_METADATA_FILE}, {deploy.VARIABLE_POOL} set; {scheduled}"
    )
    log.info("Deploy: %s", summary)
    return {"deploy": summary, "promotion": gate}


def start(config: dict[str, Any]) -> dict[str, Any]:
    """Reference entry point: deploy the packaged model named by the config."""
    as_config(config, "deploy")
    return deploy_flow(config)
