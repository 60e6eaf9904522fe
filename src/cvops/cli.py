"""`cvops` command line. Heavy imports (TensorFlow, Prefect, MLflow) happen inside commands so
that `--help` and config errors answer at once."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from cvops.runtime import bootstrap_env, configure_logging

app = typer.Typer(
    help="cvops: one config, one command from an image dataset to a monitored model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Demo dataset, shift scenarios and dataset versions.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
console = Console(stderr=True)
log = logging.getLogger("cvops.cli")


def fail(message: str, code: int = 2) -> None:
    """One unwrapped line: paths and field names stay greppable and copyable whatever the
    terminal width, and brackets in the message are text, not markup."""
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def run_config(config_path: Path) -> dict[str, Any]:
    """Validate the config, then hand it to its flow module's `start` (the reference contract)."""
    import importlib

    from cvops.config import ConfigError, load_config, resolve_flow_module

    configure_logging()
    bootstrap_env()
    try:
        cfg = load_config(config_path)
        module = importlib.import_module(resolve_flow_module(cfg.flow_module, str(config_path)))
    except ConfigError as err:
        fail(str(err))
    return module.start(cfg.to_dict()) or {}


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Flow config YAML, e.g. configs/full_flow.yaml")],
) -> None:
    """Run the flow named by the config's `flow_module` (train, eval or full)."""
    from cvops.flows.common import summary
    from cvops.settings import get_settings

    results = run_config(config)
    typer.echo(summary(results, get_settings()))


@app.command()
def version() -> None:
    """Print the cvops version."""
    from cvops import __version__

    typer.echo(__version__)


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Flow config naming the model")
    ] = None,
    workers: Annotated[
        str, typer.Option(help="gunicorn worker processes, or auto: one per usable core")
    ] = "auto",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default)")] = "127.0.0.1",
    model: Annotated[
        str | None, typer.Option(help="Metadata file in central storage models/ to serve")
    ] = None,
) -> None:
    """Start the model service (gunicorn + uvicorn workers) on the packaged model.

    The model is the one this service's replicas serve (the desired model in the prediction
    DB, shared by every host); on the first start, --model, else the config's
    deploy.model_metadata_file_name or <model_name>.yaml, else the newest one.
    Settings come from CVOPS_SERVICE_* variables or .env: CVOPS_SERVICE_ADMIN_TOKEN (bearer
    token for PUT /update_model), CVOPS_SERVICE_DB_URL (default SQLite under .cvops/service),
    CVOPS_SERVICE_BATCH_MAX_SIZE, CVOPS_SERVICE_BATCH_MAX_WAIT_MS, CVOPS_SERVICE_MAX_BODY_BYTES.
    """
    from cvops.config import ConfigError, load_config
    from cvops.service.server import resolve_workers
    from cvops.service.server import serve as run_server
    from cvops.service.settings import ServiceSettings

    configure_logging()
    try:
        worker_count = resolve_workers(workers)
    except ValueError:
        fail(f"--workers must be a whole number of at least 1 or auto, not {workers!r}")
    metadata_file = model
    if metadata_file is None and config is not None:
        try:
            cfg = load_config(config, check_flow_module=False)
        except ConfigError as err:
            fail(str(err))
        if cfg.deploy and cfg.deploy.model_metadata_file_name:
            metadata_file = cfg.deploy.model_metadata_file_name
        elif cfg.model:
            metadata_file = f"{cfg.model.model_name}.yaml"
    run_server(
        ServiceSettings(), host=host, port=port, workers=worker_count, metadata_file=metadata_file
    )


@app.command()
def monitor(
    config: Annotated[Path, typer.Option("--config", "-c", help="Flow config naming the model")],
    last_days: Annotated[
        float | None, typer.Option(help="Window: predictions of the last N days")
    ] = None,
    last_n: Annotated[int | None, typer.Option(help="Window: at most the newest N")] = None,
    alpha: Annotated[float | None, typer.Option(help="False-alarm rate of the run")] = None,
    cause_alpha: Annotated[
        float | None, typer.Option(help="Level for naming a cause (monitor.cause_alpha)")
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="Stay up and run the monitor on monitor.cron (what the deploy step starts in "
            "the background without a Prefect server)",
        ),
    ] = False,
) -> None:
    """Run the drift monitor once (the scheduled flow's checks, no server needed).

    Calibrated UAE and BBSD tests on recent predictions vs the reference data; one row per test
    in `drift_reports`, an Evidently report in the workspace, the webhook on drift. Exits 0:
    drift is a finding, not an error (look for DRIFT DETECTED). With --serve: the deployment
    drift_detection_evidently/<deploy.prefect.deployment_name>, run on the cron schedule by
    this process (Prefect's ephemeral mode) until stopped."""
    from cvops.config import ConfigError, MonitorConfig, load_config

    bootstrap_env()
    configure_logging()
    try:
        cfg = load_config(config, check_flow_module=False)
        cfg.require("model")
    except ConfigError as err:
        fail(str(err))
    overrides = {
        k: v
        for k, v in {
            "last_days": last_days,
            "last_n": last_n,
            "alpha": alpha,
            "cause_alpha": cause_alpha,
        }.items()
        if v is not None
    }
    data = cfg.to_dict()
    data["monitor"] = {**(cfg.monitor or MonitorConfig()).model_dump(mode="json"), **overrides}
    if serve:
        from cvops.deploy import monitor_parameters
        from cvops.monitor.schedule import serve_monitor

        settings = MonitorConfig.model_validate(data["monitor"])
        name = cfg.deploy.prefect.deployment_name if cfg.deploy else "drift_detection_evidently"
        serve_monitor(name, settings.cron, monitor_parameters(data, settings))
        return
    from cvops.flows import monitor_flow

    result = monitor_flow.start(data)
    verdict = "DRIFT DETECTED" if result["drifted"] else "no drift"
    typer.echo(
        f"{result['model_name']}: {verdict} over {result['sample_size']} predictions "
        f"(run {result['run_id']}); report: {result['report']}"
    )
    print_causes(result["run_id"])


def print_causes(run_id: str | None, model_name: str | None = None) -> bool:
    """The cause table of a stored monitor run on stdout; False when there is none."""
    from rich.console import Console

    from cvops.monitor.cause_view import cause_tables
    from cvops.monitor.check import stored_causes
    from cvops.records.schema import make_engine
    from cvops.service.settings import ServiceSettings

    engine = make_engine(ServiceSettings().resolved_db_url)
    try:
        row, report = stored_causes(engine, run_id, model_name)
    except Exception as err:  # noqa: BLE001 - no database or no table yet: nothing to show
        log.debug("no stored causes: %s", err)
        row, report = None, None
    finally:
        engine.dispose()
    if row is None or report is None:
        return False
    out = Console()
    verdict = "DRIFT DETECTED" if row.drifted else "no drift"
    out.print(
        f"[bold]{row.model_name}[/] v{row.model_version} run {row.run_id} "
        f"({row.created_on:%Y-%m-%d %H:%M}): {verdict}",
        highlight=False,
    )
    out.print(cause_tables(report))
    return True


drift_app = typer.Typer(help="Past drift-monitor runs and their causes.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")


@drift_app.command("show")
def drift_show(
    report_id: Annotated[
        str | None, typer.Argument(help="Run id (or its start) of a monitor run; default newest")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only runs of this model")] = None,
) -> None:
    """Print a past monitor run's causes: the sentence, ranked properties, predicted classes
    (from the prediction DB, CVOPS_SERVICE_DB_URL)."""
    bootstrap_env()
    if not print_causes(report_id, model):
        fail(f"no drift causes stored for {report_id or 'any run'}", code=1)


spool_app = typer.Typer(help="The service's request-log spools.", no_args_is_help=True)
app.add_typer(spool_app, name="spool")


@spool_app.command("drain")
def spool_drain(
    path: Annotated[
        Path,
        typer.Argument(
            help="A spool file (spool-*.db) or a folder of them (<state>/service/spool)"
        ),
    ],
    db_url: Annotated[
        str | None,
        typer.Option(help="Prediction DB (default CVOPS_SERVICE_DB_URL, else this state's SQLite)"),
    ] = None,
) -> None:
    """Write the records of spools left on a dead host's disk (or a replica's volume) into the
    prediction DB, exactly once (re-running is harmless). Spools still held by a running
    service are skipped: it flushes them itself. Uploads go where CVOPS_SERVICE_STORE_IMAGES
    says, as in the service."""
    from cvops.records.images import ImageStore
    from cvops.service.recording import SpoolBusy, drain_spool
    from cvops.service.settings import ServiceSettings
    from cvops.storage import open_storage

    bootstrap_env()
    configure_logging()
    settings = ServiceSettings()
    url = db_url or settings.resolved_db_url
    images = open_storage(settings) if settings.store_images is ImageStore.CENTRAL_STORAGE else None
    files = sorted(path.glob("spool-*.db")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        fail(f"no spool file at {path}")
    total = 0
    for spool_file in files:
        try:
            moved = drain_spool(url, spool_file, images)
        except SpoolBusy as err:
            typer.echo(f"skipped: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - the records stay in the spool
            fail(f"{spool_file}: not drained, its records stay there ({err})")
        total += moved
        typer.echo(f"{spool_file}: {moved} records written")
    typer.echo(f"{total} records written to the prediction DB")


@app.command("background")
def background_cmd(
    stop: Annotated[bool, typer.Option("--stop", help="Stop them (with their children)")] = False,
) -> None:
    """Show (or --stop) the embedded-mode background processes: the model service and the
    monitor scheduler that `cvops run` starts when no service URL / Prefect server is set."""
    from cvops import background
    from cvops.settings import get_settings

    configure_logging()
    state = get_settings().state_dir
    if stop:
        stopped = background.stop_all(state)
        typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return
    typer.echo(background.describe(state))


@app.command()
def rollback(
    config: Annotated[Path, typer.Option("--config", "-c", help="Flow config naming the model")],
) -> None:
    """Serve the previous champion again: registry alias, model service, Prefect Variable."""
    from mlflow.tracking import MlflowClient

    from cvops import deploy, tracking
    from cvops.config import ConfigError, load_config
    from cvops.settings import get_settings

    configure_logging()
    bootstrap_env()
    try:
        cfg = load_config(config, check_flow_module=False)
    except ConfigError as err:
        fail(str(err))
    cfg.require("model")
    settings = get_settings()
    tracking.configure(settings)
    url = deploy.service_url(cfg.deploy.service_url if cfg.deploy else None)
    token = os.environ.get("CVOPS_SERVICE_ADMIN_TOKEN")
    if url is None:
        url, token = deploy.local_service(settings) or (None, token)
    try:
        summary = deploy.rollback(
            MlflowClient(),
            settings.central_storage_path,
            cfg.model.model_name,
            url=url,
            token=token,
        )
    except RuntimeError as err:
        fail(str(err), code=1)
    typer.echo(summary)


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Argument(help="Output folder: <out>/{train,test}/<class>/*.jpg")],
    train_per_class: int = 250,
    test_per_class: int = 60,
    seed: int = 0,
    n_classes: Annotated[int, typer.Option(help="Use the first N demo classes (0: all)")] = 0,
) -> None:
    """Write the deterministic demo dataset (+ annotations.csv with bounding boxes)."""
    from cvops.data.demo import CLASSES, generate_demo_dataset

    configure_logging()
    classes = CLASSES[:n_classes] if n_classes else None
    csv = generate_demo_dataset(
        out,
        n_train_per_class=train_per_class,
        n_test_per_class=test_per_class,
        seed=seed,
        classes=classes,
    )
    typer.echo(f"Demo dataset written to {out} (annotations: {csv})")


@data_app.command("demo-repo")
def data_demo_repo(
    root: Annotated[Path, typer.Option(help="Folder holding datasets")] = Path("datasets"),
    name: str = "demo-shapes",
    seed: int = 0,
    v1_train_per_class: int = 200,
    v2_train_per_class: int = 250,
    test_per_class: int = 60,
    n_classes: Annotated[int, typer.Option(help="Use the first N demo classes (0: all)")] = 0,
) -> None:
    """Create the demo dataset as a DVC repo with tags v1.0.0 and v2.0.0 (idempotent)."""
    from cvops.data.demo import CLASSES
    from cvops.data.demo_repo import build_demo_repo
    from cvops.settings import get_settings

    configure_logging()
    bootstrap_env()
    settings = get_settings()
    repo = root / name
    tags = build_demo_repo(
        repo,
        settings.dvc_remote(name),
        seed=seed,
        v1_train_per_class=v1_train_per_class,
        v2_train_per_class=v2_train_per_class,
        test_per_class=test_per_class,
        classes=CLASSES[:n_classes] if n_classes else None,
    )
    typer.echo(f"DVC dataset repo {repo} with tags {', '.join(tags)}")


@data_app.command("shift")
def data_shift(
    test_dir: Annotated[Path, typer.Argument(help="A test split folder: <dir>/<class>/*.jpg")],
    out: Annotated[Path, typer.Argument(help="Output folder for the scenarios")],
    annotations: Annotated[
        Path | None, typer.Option(help="Demo annotations CSV (for re-rendered scenarios)")
    ] = None,
    seed: int = 0,
) -> None:
    """Write drift scenarios (brightness, blur, noise, background, class prior, unseen class)."""
    from cvops.data.shift import generate_shift_scenarios

    configure_logging()
    manifest = generate_shift_scenarios(test_dir, out, seed=seed, annotations=annotations)
    typer.echo(f"Shift scenarios written to {out} (manifest: {manifest})")


@data_app.command("validate")
def data_validate(
    dataset: Annotated[
        Path, typer.Argument(help="Dataset folder: <dir>/{train,test}/<class>/* (or <dir>/images/)")
    ],
    out: Annotated[Path, typer.Option(help="Where to write the HTML report")] = Path(
        "validation_report.html"
    ),
    classes: Annotated[
        list[str] | None,
        typer.Option(help="Expected classes (repeat or comma-separate); default: all folders"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Flow config YAML: use its train.validation gates")
    ] = None,
    workers: Annotated[int, typer.Option(help="Decode worker processes")] = 2,
) -> None:
    """Check train/test splits (leakage, duplicates, corrupt files, balance, drift); exit 1 when
    a gate fails."""
    from cvops.config import ConfigError, ValidationGateConfig, load_config
    from cvops.data.images import DatasetLayoutError
    from cvops.data.validation import failure_message, validate_dataset, write_html_report

    configure_logging()
    gates = ValidationGateConfig()
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as err:
            fail(str(err))
        if cfg.train is not None:
            gates = cfg.train.validation
        if classes is None and cfg.model is not None:
            classes = cfg.model.classes
    wanted = [c for item in classes for c in item.split(",") if c] if classes else None
    try:
        result = validate_dataset(dataset, classes=wanted, gates=gates, workers=workers)
    except DatasetLayoutError as err:
        fail(str(err))
    report = write_html_report(result, out)
    for gate in result.gates:
        typer.echo(f"  {gate.status:<4}  {gate.name:<15} {gate.message}")
    typer.echo(f"Data validation {result.status}; report: {report.resolve()}")
    if result.gate_failures:
        console.print(
            failure_message(result, report.resolve()), highlight=False, markup=False, soft_wrap=True
        )
        raise typer.Exit(1)


@data_app.command("version")
def data_version(
    dataset: Annotated[Path, typer.Argument(help="A DVC dataset repo folder")],
) -> None:
    """Show the dataset's git tag, DVC hash and whether the workspace is dirty."""
    from cvops.data.versioning import current_version

    typer.echo(json.dumps(current_version(dataset).as_dict(), indent=2))


def _register_stack_commands() -> None:
    from cvops.labelling.cli import register as register_label
    from cvops.stack.cli import register

    register(app)
    register_label(app)


_register_stack_commands()

if __name__ == "__main__":
    app()
