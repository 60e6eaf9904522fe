"""Monitor flow `drift_detection_evidently`: recent predictions vs reference data.

Scheduled by the deploy flow with the reference's parameters (`last_days`, `last_n`, Evidently
project); `start(config)` / `cvops monitor` run it once on embedded defaults.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from prefect import flow
from tenacity import retry, stop_after_attempt, wait_exponential

from cvops.config import MonitorConfig
from cvops.flows.common import as_config, step
from cvops.monitor.causes import CAUSE_ALPHA
from cvops.monitor.check import DriftCheck, describe
from cvops.monitor.run import run_monitor
from cvops.service.settings import ServiceSettings
from cvops.settings import get_settings
from cvops.storage import open_storage

log = logging.getLogger(__name__)


@retry(wait=wait_exponential(multiplier=0.5, max=5), stop=stop_after_attempt(3), reraise=True)
def post_webhook(url: str, payload: dict[str, Any]) -> None:
    httpx.post(url, json=payload, timeout=10).raise_for_status()


def alert_payload(check: DriftCheck) -> dict[str, Any]:
    return {
        "event": "drift_detected",
        "model_name": check.model_name,
        "model_version": check.model_version,
        "run_id": check.run_id,
        "sample_size": check.window.size,
        "drifted_tests": check.drifting_tests,
        "likely_cause": check.causes.sentence if check.causes else None,
        "causes": check.causes.as_dict() if check.causes else None,
    }


@step("check-drift")
def check_step(
    metadata_file: str,
    last_days: float,
    last_n: int,
    alpha: float,
    cause_alpha: float = CAUSE_ALPHA,
) -> DriftCheck:
    settings = get_settings()
    return run_monitor(
        open_storage(settings),
        metadata_file,
        ServiceSettings().resolved_db_url,
        last_days=last_days,
        last_n=last_n,
        alpha=alpha,
        cause_alpha=cause_alpha,
    )


@step("evidently-report")
def report_step(check: DriftCheck, metadata_file: str, monitor: MonitorConfig) -> str | None:
    """Evidently report (our calibrated results + Evidently's views) into the workspace."""
    if not check.results:
        return None
    from cvops.monitor.check import load_reference
    from cvops.monitor.evidently_report import build_snapshot, save_to_workspace, write_html

    storage = open_storage(get_settings())
    meta = storage.load_metadata(metadata_file)
    snapshot = build_snapshot(
        check,
        load_reference(storage, meta),
        classes=meta.classes,
        evidently_mmd=monitor.evidently_mmd,
    )
    snapshot_id = save_to_workspace(snapshot, monitor.workspace, monitor.evidently_project)
    html = write_html(
        snapshot, monitor.workspace / "reports" / f"{check.run_id}.html", check.causes
    )
    log.info("Evidently report %s in workspace %s (%s)", snapshot_id, monitor.workspace, html)
    return str(html)


@step("alert")
def alert_step(check: DriftCheck, monitor: MonitorConfig) -> list[str]:
    actions = []
    if monitor.webhook_url:
        try:
            post_webhook(monitor.webhook_url, alert_payload(check))
            actions.append(f"webhook {monitor.webhook_url}")
        except httpx.HTTPError as err:
            log.error("Drift webhook %s failed: %s", monitor.webhook_url, err)
    return actions


def retrain(config: dict[str, Any] | None) -> str:
    """Drift with `retrain_on_drift`: run the full flow (train -> evaluate -> deploy) with the
    config that deployed the model; the promotion gate decides whether the new model serves."""
    if not config:
        log.error(
            "monitor.retrain_on_drift is set but the run has no retrain_config: "
            "redeploy so the deployment carries the flow config"
        )
        return "retraining skipped: no retrain_config"
    if (config.get("labelling") or {}).get("push_on_drift"):
        from cvops.labelling.commands import push_on_drift

        # new labels first: retraining on the old data would not fix the drift
        return push_on_drift(config)
    from cvops.flows import full_flow

    log.warning("Drift: retraining with the full flow (monitor.retrain_on_drift)")
    result = full_flow.start(config)
    outcome = result.get("deploy") or "trained"
    log.info("Retraining after drift finished: %s", outcome)
    return f"retrained: {outcome}"


@flow(name="drift_detection_evidently", log_prints=True)
def drift_detection_evidently(
    last_days: float = 7,
    last_n: int = 500,
    evidently_project: str = "cvops-drift-monitoring",
    metadata_file: str | None = None,
    alpha: float = 0.05,
    cause_alpha: float = CAUSE_ALPHA,
    webhook_url: str | None = None,
    workspace: str = ".cvops/evidently",
    evidently_mmd: bool = False,
    retrain_on_drift: bool = False,
    retrain_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One monitor run; the model is the Prefect Variable `current_model_metadata_file`
    unless `metadata_file` is given. On drift with `retrain_on_drift`, the full flow runs with
    `retrain_config` (the flow config the deploy step passed)."""
    if metadata_file is None:
        from prefect.variables import Variable

        from cvops.deploy import VARIABLE_METADATA_FILE

        metadata_file = Variable.get(VARIABLE_METADATA_FILE, default=None)
        if not metadata_file:
            raise RuntimeError(
                f"no model to monitor: Prefect Variable {VARIABLE_METADATA_FILE} is not set "
                "(run the deploy flow first, or pass metadata_file)"
            )
    monitor = MonitorConfig(
        last_days=last_days,
        last_n=last_n,
        alpha=alpha,
        cause_alpha=cause_alpha,
        evidently_project=evidently_project,
        webhook_url=webhook_url,
        workspace=workspace,
        evidently_mmd=evidently_mmd,
        retrain_on_drift=retrain_on_drift,
    )
    check = check_step(metadata_file, last_days, last_n, alpha, cause_alpha)
    log.info("%s", describe(check))
    report = report_step(check, metadata_file, monitor)
    actions = alert_step(check, monitor) if check.drifted else []
    if check.drifted and retrain_on_drift:
        actions.append(retrain(retrain_config))
    return {
        "run_id": check.run_id,
        "model_name": check.model_name,
        "sample_size": check.window.size,
        "drifted": check.drifted,
        "likely_cause": check.causes.sentence if check.causes else None,
        "live_accuracy": check.live_accuracy,
        "actions": actions,
        "report": report,
    }


def start(config: dict[str, Any]) -> dict[str, Any]:
    """Reference entry point: one monitor run for the model named by the config."""
    from cvops.flows.eval_flow import metadata_file_name

    cfg = as_config(config, "model")
    monitor = cfg.monitor or MonitorConfig()
    return drift_detection_evidently(
        last_days=monitor.last_days,
        last_n=monitor.last_n,
        evidently_project=monitor.evidently_project,
        metadata_file=metadata_file_name(cfg),
        alpha=monitor.alpha,
        cause_alpha=monitor.cause_alpha,
        webhook_url=monitor.webhook_url,
        workspace=str(monitor.workspace),
        evidently_mmd=monitor.evidently_mmd,
        retrain_on_drift=monitor.retrain_on_drift,
        retrain_config=cfg.to_dict() if monitor.retrain_on_drift else None,
    )
