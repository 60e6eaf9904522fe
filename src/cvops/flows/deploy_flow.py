"""Deploy flow: promotion gate -> registry alias `champion` -> model service reload ->
Prefect Variables -> the drift-monitor deployment on a process (or kubernetes) work pool."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import keras
import mlflow.keras
import yaml
from mlflow.tracking import MlflowClient
from prefect import flow

from cvops import background, deploy, tracking
from cvops.config import FlowConfig, MonitorConfig
from cvops.flows.common import as_config, step
from cvops.flows.eval_flow import metadata_file_name
from cvops.model.evaluate import evaluate_on_split
from cvops.settings import Settings, get_settings
from cvops.storage import CentralStorage, ModelMetadata, PackageNotFoundError, open_storage

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
        path = storage.local_copy(meta.model_path, meta.sha256.get("model_path"))
        new_model = keras.models.load_model(path, compile=False)
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
def update_service(cfg: FlowConfig, settings: Settings, metadata_file: str) -> str:
    """PUT the model on the configured service; on embedded defaults (no service URL) on a
    background `cvops serve` started here when none answers on the local port."""
    assert cfg.deploy is not None
    url = deploy.service_url(cfg.deploy.service_url)
    token = os.environ.get("CVOPS_SERVICE_ADMIN_TOKEN")
    started = ""
    if url is None:
        if not settings.background:
            message = "no model service configured (deploy.service_url or CVOPS_SERVICE_URL)"
            log.warning("Deploy: %s; the service will load the champion when it starts", message)
            return message
        url, fresh = deploy.ensure_local_service(settings, metadata_file)
        token = background.service_token(Path(settings.state_dir))
        process = background.Background(background.SERVICE, Path(settings.state_dir))
        started = (
            f" (local service {'started' if fresh else 'running'} in the background, "
            f"pid {process.pid()}, log {process.log_file})"
        )
    result = deploy.update_service_model(url, metadata_file, token)
    served = f"{result['model_name']} v{result['model_version']}"
    return f"{url} serves {served} in {result['workers']} workers{started}"


@step("schedule-monitoring")
def schedule_monitoring(cfg: FlowConfig, settings: Settings, monitor: MonitorConfig) -> str:
    """The monitor deployment on the Prefect server (Jobs on the cvops image when the pool is
    of type kubernetes, else a process pool); on embedded defaults a background
    `cvops monitor --serve` scheduler (Prefect's ephemeral mode keeps no schedule itself)."""
    assert cfg.deploy is not None
    name = cfg.deploy.prefect.deployment_name
    config = cfg.to_dict()
    if not deploy.prefect_server_configured():
        if not settings.background:
            message = (
                "monitoring not scheduled: no Prefect server (set PREFECT_API_URL) and "
                "background processes are off (CVOPS_BACKGROUND=false); run `cvops monitor "
                "--config ...` on a schedule instead"
            )
            log.warning("Deploy: %s", message)
            return message
        process = start_embedded_scheduler(config, settings)
        return (
            f"monitoring scheduled: {deploy.MONITOR_FLOW_NAME}/{name}, cron {monitor.cron!r}, "
            f"served by a background scheduler (Prefect ephemeral mode, pid {process.pid()}, "
            f"log {process.log_file})"
        )
    parameters = deploy.monitor_parameters(config, monitor)
    if deploy.monitor_pool_type(monitor.pool_name) == "kubernetes":
        _, variables = deploy.schedule_monitor_on_kubernetes(
            name, monitor.pool_name, monitor.cron, parameters
        )
        if deploy.pool_has_online_worker(monitor.pool_name):
            worker = "a worker is online"
        else:
            worker = "no worker online: kubectl apply -k deploy/k8s/overlays/<overlay>"
        return (
            f"monitoring scheduled: {deploy.MONITOR_FLOW_NAME}/{name} on kubernetes pool "
            f"{monitor.pool_name} (Jobs on {variables['image']}), cron {monitor.cron!r} "
            f"({worker})"
        )
    env = deploy.monitor_env(settings)
    deploy.schedule_monitor(name, monitor.pool_name, monitor.cron, parameters, env, str(Path.cwd()))
    if deploy.pool_has_online_worker(monitor.pool_name):
        worker = "a worker is online"
    else:
        worker = f"start a worker: prefect worker start --pool {monitor.pool_name} --type process"
    return (
        f"monitoring scheduled: {deploy.MONITOR_FLOW_NAME}/{name} on pool {monitor.pool_name}, "
        f"cron {monitor.cron!r} ({worker})"
    )


def start_embedded_scheduler(config: dict[str, Any], settings: Settings) -> background.Background:
    """(Re)start `cvops monitor --serve` on the deployed config, written to the run folder."""
    state = Path(settings.state_dir)
    path = background.run_dir(state) / "monitor-config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    process = background.Background(background.SCHEDULER, state)
    process.stop()
    process.start(background.cvops_command("monitor", "--config", str(path), "--serve"))
    return process


def pinned_metadata_file(storage: CentralStorage, metadata_file: str, meta: ModelMetadata) -> str:
    """The immutable versioned package behind `<model>.yaml`, which the next training (of any
    registry sharing this storage, promoted or not) rewrites: deployed by its versioned name,
    the service (and a worker respawned later) and the monitor keep exactly this model."""
    if meta.version is None or meta.mlflow_run_id is None:
        return metadata_file
    try:
        return storage.find_version(meta.model_name, meta.version, meta.mlflow_run_id)
    except PackageNotFoundError as err:
        log.warning("Deploying %s by its mutable name: %s", metadata_file, err)
        return metadata_file


@flow(name="deploy_flow", log_prints=True)
def deploy_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = as_config(config, "deploy")
    settings: Settings = get_settings()
    tracking.configure(settings)
    storage = open_storage(settings)
    metadata_file = metadata_file_name(cfg)
    meta = storage.load_metadata(metadata_file)
    metadata_file = pinned_metadata_file(storage, metadata_file, meta)
    gate = promotion_gate(cfg, storage, meta)
    if not gate["promote"]:
        return {"deploy": f"not promoted: {gate['reason']}"}
    if meta.version is not None:
        deploy.promote(MlflowClient(), meta.model_name, meta.version)
    service = update_service(cfg, settings, metadata_file)
    monitor = cfg.monitor or MonitorConfig()
    deploy.set_prefect_variables(metadata_file, monitor.pool_name)
    scheduled = schedule_monitoring(cfg, settings, monitor)
    summary = (
        f"{meta.model_name} v{meta.version} is champion; {service}; Prefect Variables "
        f"{deploy.VARIABLE_METADATA_FILE}, {deploy.VARIABLE_POOL} set; {scheduled}"
    )
    if any(background.Background(n, Path(settings.state_dir)).alive() for n in background.NAMES):
        summary += f"; {background.describe(Path(settings.state_dir))}"
    log.info("Deploy: %s", summary)
    return {"deploy": summary, "promotion": gate}


def start(config: dict[str, Any]) -> dict[str, Any]:
    """Reference entry point: deploy the packaged model named by the config."""
    as_config(config, "deploy")
    return deploy_flow(config)
