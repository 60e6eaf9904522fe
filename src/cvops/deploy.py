"""Deployment steps as plain functions: promotion gate, registry aliases, service reload,
Prefect Variables. The deploy flow only orchestrates them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
VARIABLE_METADATA_FILE = "current_model_metadata_file"
VARIABLE_POOL = "monitor_pool_name"
PGPASS_FILE = "pgpass"  # in the state dir: database passwords of scheduled monitor runs


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    new_score: float
    champion_score: float | None


def decide_promotion(
    new_score: float, champion_score: float | None, max_drop: float, metric: str
) -> PromotionDecision:
    """Promote unless the new model is worse than the champion by more than `max_drop`."""
    if champion_score is None:
        return PromotionDecision(True, "no champion yet", new_score, None)
    drop = champion_score - new_score
    if drop > max_drop:
        reason = (
            f"{metric} {new_score:.4f} is {drop:.4f} below the champion's {champion_score:.4f} "
            f"(allowed drop {max_drop:.4f})"
        )
        return PromotionDecision(False, reason, new_score, champion_score)
    reason = f"{metric} {new_score:.4f} vs champion {champion_score:.4f} (allowed drop {max_drop})"
    return PromotionDecision(True, reason, new_score, champion_score)


def champion_version(client: MlflowClient, name: str, alias: str = CHAMPION) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Make `version` the champion; the old champion becomes `previous`. Returns the old one."""
    old = champion_version(client, name)
    if old == str(version):
        return old
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    log.info("Registry: %s champion v%s (previous: v%s)", name, version, old)
    return old


def rollback_aliases(client: MlflowClient, name: str) -> tuple[str, str]:
    """Swap champion and previous; returns (new champion, new previous)."""
    champion, previous = champion_version(client, name), champion_version(client, name, PREVIOUS)
    if previous is None or champion is None:
        raise RuntimeError(f"{name}: nothing to roll back to (no '{PREVIOUS}' alias)")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_alias(name, PREVIOUS, champion)
    return previous, champion


def service_url(configured: str | None) -> str | None:
    return configured or os.environ.get("CVOPS_SERVICE_URL") or None


@retry(
    retry=retry_if_exception_type(httpx.TransportError),
    wait=wait_exponential(multiplier=0.5, max=5),
    stop=stop_after_attempt(5),
    reraise=True,
)
def update_service_model(base_url: str, metadata_file: str, token: str | None) -> dict:
    """`PUT /update_model/{metadata_file}` on the service; returns once all workers serve it."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.put(
        f"{base_url.rstrip('/')}/update_model/{metadata_file}", headers=headers, timeout=120
    )
    if response.status_code != 200:
        raise RuntimeError(
            f"service refused model {metadata_file}: HTTP {response.status_code} {response.text}"
        )
    return response.json()


def set_prefect_variables(metadata_file: str, pool_name: str) -> None:
    from prefect.variables import Variable

    Variable.set(VARIABLE_METADATA_FILE, metadata_file, overwrite=True)
    Variable.set(VARIABLE_POOL, pool_name, overwrite=True)


def rollback(
    client: MlflowClient,
    storage_root: str | os.PathLike[str],
    model_name: str,
    *,
    url: str | None,
    token: str | None,
    set_variables: bool = True,
) -> str:
    """Serve the previous champion again: registry aliases, model service, Prefect Variable.

    The package is found by the registry version's run id, not by its version number alone
    (another registry sharing central storage has its own "v1"), and the service must answer
    with that run id; the summary names the metadata file and the run."""
    from cvops.storage import CentralStorage, PackageNotFoundError

    storage = CentralStorage(storage_root)
    try:
        previous = client.get_model_version_by_alias(model_name, PREVIOUS)
    except MlflowException:
        message = f"{model_name}: nothing to roll back to (no '{PREVIOUS}' alias)"
        raise RuntimeError(message) from None
    version, run_id = str(previous.version), previous.run_id
    try:
        metadata_file = storage.find_version(model_name, version, run_id)
    except PackageNotFoundError as err:
        raise RuntimeError(f"cannot roll back: {err}") from None
    steps = []
    if url:
        result = update_service_model(url, metadata_file, token)
        served = result.get("mlflow_run_id", run_id)  # older services do not report it
        if served != run_id:
            raise RuntimeError(
                f"{url} loaded {result.get('metadata_file')} of run {served}, not run {run_id}"
            )
        steps.append(f"{url} serves v{result['model_version']}")
    rollback_aliases(client, model_name)
    steps.append(f"registry champion v{version}")
    if set_variables:
        set_prefect_variables(
            metadata_file, os.environ.get("CVOPS_MONITOR_POOL", "production-model-pool")
        )
        steps.append(f"Prefect Variable {VARIABLE_METADATA_FILE}={metadata_file}")
    summary = (
        f"Rolled back {model_name} to v{version} (run {run_id}, {metadata_file}): "
        + "; ".join(steps)
    )
    log.info(summary)
    return summary


MONITOR_FLOW_NAME = "drift_detection_evidently"
# A module path, not a file in a source folder: the worker imports the installed cvops, and the
# deployment's source (pull step) is the project folder, so a flow run works in the same folder
# as the deploying run (its .env, the config's relative paths).
MONITOR_ENTRYPOINT = "cvops.flows.monitor_flow.drift_detection_evidently"


def prefect_server_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def monitor_env(settings: Any) -> dict[str, str]:
    """Where a scheduled monitor run finds central storage, state and the prediction DB.

    Resolved here, at deploy time, so a worker started anywhere (or with another environment)
    monitors what this deploy published. Job variables are stored in Prefect's database and
    shown in its UI, so database passwords go to a 0600 libpq password file in the state dir
    instead (`PGPASSFILE`); the URLs carry none."""
    from cvops.service.settings import ServiceSettings
    from cvops.storage import location_text

    state_dir = Path(settings.state_dir).resolve()
    passfile = state_dir / PGPASS_FILE
    env = {
        "CENTRAL_STORAGE_PATH": location_text(settings.central_storage_path),
        "CVOPS_STATE_DIR": str(state_dir),
        "CVOPS_SERVICE_DB_URL": ServiceSettings().resolved_db_url,
    }
    # object storage: where it is (never the credentials: the worker's environment has them)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        if isinstance(settings.central_storage_path, str) and os.environ.get(name):
            env[name] = os.environ[name]
    if settings.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    moved = False
    for name in ("CVOPS_SERVICE_DB_URL", "MLFLOW_TRACKING_URI"):
        if name in env:
            env[name], found = move_password_to_passfile(env[name], passfile)
            moved = moved or found
    if moved:
        env["PGPASSFILE"] = str(passfile)
    return env


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def move_password_to_passfile(url: str, passfile: Path) -> tuple[str, bool]:
    """A PostgreSQL URL's password goes to the libpq password file `passfile` (its line for
    this host/port/database/user replaced, mode 0600); returns the URL without it and whether
    there was one. Other URLs come back unchanged."""
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url, False
    if not parsed.password or not parsed.drivername.startswith("postgresql"):
        return url, False
    fields = (parsed.host or "localhost", str(parsed.port or 5432), parsed.database or "*")
    key = ":".join(_pgpass_field(v) for v in (*fields, parsed.username or "*")) + ":"
    passfile.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if passfile.is_file():
        kept = [line for line in passfile.read_text().splitlines() if not line.startswith(key)]
    tmp = passfile.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join([*kept, key + _pgpass_field(str(parsed.password))]) + "\n")
    os.replace(tmp, passfile)
    bare = URL.create(
        parsed.drivername,
        parsed.username,
        None,  # URL.set(password=None) would keep the password
        parsed.host,
        parsed.port,
        parsed.database,
        parsed.query,
    )
    return bare.render_as_string(hide_password=False), True


def monitor_parameters(config: dict[str, Any], monitor: Any) -> dict[str, Any]:
    """Parameters of the scheduled monitor flow (Prefect deployment or embedded scheduler).

    With `monitor.retrain_on_drift` the flow config travels with them: on drift the monitor
    retrains with the config that deployed the current model."""
    parameters: dict[str, Any] = {
        "last_days": monitor.last_days,
        "last_n": monitor.last_n,
        "evidently_project": monitor.evidently_project,
        "alpha": monitor.alpha,
        "cause_alpha": monitor.cause_alpha,
        "webhook_url": monitor.webhook_url,
        "workspace": str(Path(monitor.workspace).resolve()),
        "evidently_mmd": monitor.evidently_mmd,
        "retrain_on_drift": monitor.retrain_on_drift,
    }
    if monitor.retrain_on_drift:
        parameters["retrain_config"] = config
    return parameters


def schedule_monitor(
    deployment_name: str,
    pool_name: str,
    cron: str,
    parameters: dict[str, object],
    env: dict[str, str],
    working_dir: str,
) -> str:
    """Create or update the monitor deployment on a process work pool (no prompts).

    The flow's code is the installed `cvops` package (module entrypoint); the deployment's
    source is `working_dir`, so the worker's flow run starts there (Prefect's pull step)."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool_name, type="process"))
            log.info("Created process work pool %s", pool_name)
        except ObjectAlreadyExists:
            pass
    remote = Flow.from_source(
        source=str(Path(working_dir).resolve()), entrypoint=MONITOR_ENTRYPOINT
    )
    deployment_id = remote.deploy(
        name=deployment_name,
        work_pool_name=pool_name,
        build=False,
        push=False,
        cron=cron,
        parameters=parameters,
        job_variables={"env": env, "working_dir": working_dir},
        print_next_steps=False,
        ignore_warnings=True,
    )
    log.info(
        "Deployment %s/%s on pool %s, cron %r", MONITOR_FLOW_NAME, deployment_name, pool_name, cron
    )
    return str(deployment_id)


def monitor_pool_type(pool_name: str) -> str | None:
    """The type of the Prefect server's work pool `pool_name` (None: no such pool yet)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool_name).type
        except ObjectNotFound:
            return None


def schedule_monitor_on_kubernetes(
    deployment_name: str, pool_name: str, cron: str, parameters: dict[str, object]
) -> tuple[str, dict[str, Any]]:
    """Create or update the monitor deployment on a kubernetes work pool (deploy/k8s): each
    run is a Job on the cvops image that reads its settings from the cluster's ConfigMap and
    Secrets (`cvops.cluster.job_variables`), so no path or URL of the deploying machine goes
    into the deployment. The flow is imported from the installed package: no pull steps (a
    former process deployment's working-directory step is dropped). Returns (deployment id,
    job variables)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType, RunnerDeployment

    from cvops import cluster
    from cvops.flows.monitor_flow import drift_detection_evidently

    settings = cluster.load_settings()
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(pool_name)
    variables = cluster.job_variables(settings, pool.base_job_template)
    deployment = RunnerDeployment.from_flow(
        drift_detection_evidently,
        name=deployment_name,
        cron=cron,
        # the Evidently workspace the Jobs mount (and the Evidently UI serves)
        parameters={**parameters, "workspace": settings.evidently_workspace},
        work_pool_name=pool_name,
        job_variables=variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    if deployment.entrypoint != MONITOR_ENTRYPOINT:
        raise RuntimeError(f"monitor entrypoint {deployment.entrypoint}, not {MONITOR_ENTRYPOINT}")
    deployment_id = deployment.apply(work_pool_name=pool_name)
    log.info(
        "Deployment %s/%s on kubernetes pool %s (image %s), cron %r",
        MONITOR_FLOW_NAME,
        deployment_name,
        pool_name,
        variables["image"],
        cron,
    )
    return str(deployment_id), variables


def local_service(settings: Any) -> tuple[str, str] | None:
    """Embedded mode's background service, if it runs and answers as itself (its recorded
    port and instance id, never whatever holds the default port): (URL, admin token)."""
    from cvops.background import is_ours, service_record, service_token

    record = service_record(Path(settings.state_dir))
    if record is None or not is_ours(record):
        return None
    return record.url, service_token(Path(settings.state_dir))


def pool_has_online_worker(pool: str, api_url: str | None = None) -> bool:
    """Whether the Prefect server lists a worker of `pool` as ONLINE (a plain API call)."""
    if api_url is None:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
    try:
        reply = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=3)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200 and any(w.get("status") == "ONLINE" for w in reply.json())


def ensure_local_service(
    settings: Any, metadata_file: str, wait_s: float = 300
) -> tuple[str, bool]:
    """Embedded mode: this state folder's background `cvops serve` on loopback, found by its
    recorded port and instance id, else started on `metadata_file` on `settings.service_port`
    (a free port when another program holds it). Returns (URL, started now)."""
    from cvops.background import ensure_service

    return ensure_service(
        Path(settings.state_dir),
        settings.service_port,
        lambda port: _serve_command(settings, metadata_file, port),
        wait_s=wait_s,
    )


def _serve_command(settings: Any, metadata_file: str, port: int) -> list[str]:
    from cvops.background import cvops_command

    return cvops_command(
        "serve",
        "--port",
        str(port),
        "--workers",
        str(settings.service_workers),
        "--model",
        metadata_file,
    )
