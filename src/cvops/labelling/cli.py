"""`cvops label push / pull`: the labelling loop from the command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger(__name__)

label_app = typer.Typer(
    help="Label what matters in Label Studio, and bring the labels back as the next dataset "
    "version (CVOPS_LABEL_STUDIO_URL / CVOPS_LABEL_STUDIO_TOKEN; `cvops up` sets both).",
    no_args_is_help=True,
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Flow config naming the model")]


def _fail(message: str, code: int = 2) -> None:
    from cvops.cli import fail

    fail(message, code)


def _setup(config: Path, overrides: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(flow config, labelling config, prediction-DB engine, Label Studio client)."""
    from cvops.config import ConfigError, LabellingConfig, load_config
    from cvops.labelling.client import LabelStudio
    from cvops.labelling.settings import LabelStudioSettings
    from cvops.runtime import bootstrap_env, configure_logging
    from cvops.service.db import make_engine
    from cvops.service.settings import ServiceSettings

    configure_logging()
    bootstrap_env()
    try:
        cfg = load_config(config, check_flow_module=False)
        cfg.require("model")
        data = (cfg.labelling or LabellingConfig()).model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        labelling = LabellingConfig.model_validate(data)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
    try:
        url, token = LabelStudioSettings().require()
    except ValueError as err:
        _fail(str(err))
    engine = make_engine(ServiceSettings().resolved_db_url)
    return cfg, labelling, engine, LabelStudio(url, token)


def load_model_metadata(metadata_file: str) -> tuple[Any, Any]:
    """(central storage, the model's metadata), from a folder or object storage."""
    from cvops.settings import get_settings
    from cvops.storage import open_storage

    store = open_storage(get_settings())
    return store, store.load_metadata(metadata_file)


@label_app.command("push")
def push_cmd(
    config: ConfigOption,
    n: Annotated[int | None, typer.Option("--n", help="Tasks to send (labelling.n)")] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="least_confidence, margin, entropy, drift_weighted or random (labelling.strategy)"
        ),
    ] = None,
    random_share: Annotated[
        float | None, typer.Option(help="Share drawn at random, the control arm")
    ] = None,
) -> None:
    """Send the current model's predictions most worth a label to its Label Studio project
    (pre-annotated with the model's answer); never the same image twice."""
    from cvops.flows.eval_flow import metadata_file_name
    from cvops.labelling.client import LabelStudioError
    from cvops.labelling.loop import push
    from cvops.monitor.check import load_reference

    cfg, labelling, engine, studio = _setup(
        config, {"n": n, "strategy": strategy, "random_share": random_share}
    )
    try:
        storage, meta = load_model_metadata(metadata_file_name(cfg))
        reference = None
        if labelling.strategy == "drift_weighted":
            reference = load_reference(storage, meta)
        result = push(engine, studio, meta, labelling, reference=reference)
    except (LabelStudioError, FileNotFoundError) as err:
        _fail(str(err), code=1)
    finally:
        studio.close()
        engine.dispose()
    typer.echo(f"{meta.model_name} v{meta.version}: {result.describe()}")


@label_app.command("pull")
def pull_cmd(
    config: ConfigOption,
    retrain: Annotated[
        bool,
        typer.Option(
            "--retrain",
            help="Then run the full flow on the new dataset version; the promotion gate "
            "decides whether the new model serves",
        ),
    ] = False,
) -> None:
    """Bring completed annotations back: feedback rows (live accuracy), the images in
    images/train/<class>/ as the next dataset version (committed, tagged, pushed to the DVC
    remote); pulling again adds nothing twice."""
    from cvops.data.versioning import DataVersionError
    from cvops.labelling.client import LabelStudioError
    from cvops.labelling.loop import pull

    cfg, labelling, engine, studio = _setup(config, {})
    try:
        cfg.require("dataset")
    except ValueError as err:
        _fail(str(err))
    try:
        result = pull(engine, studio, cfg, labelling)
    except (LabelStudioError, DataVersionError, ValueError) as err:
        _fail(str(err), code=1)
    finally:
        studio.close()
        engine.dispose()
    typer.echo(result.describe())
    if not retrain:
        return
    if result.tag is None:
        typer.echo("no new dataset version: nothing to retrain on")
        return
    from cvops.flows import full_flow
    from cvops.flows.common import summary
    from cvops.settings import get_settings

    data = cfg.to_dict()
    data["flow_module"] = "cvops.flows.full_flow"
    data["dataset"]["dvc_tag"] = result.tag
    data["dataset"]["dvc_checkout"] = True
    outcome = full_flow.start(data) or {}
    typer.echo(summary(outcome, get_settings()))


def register(app: typer.Typer) -> None:
    app.add_typer(label_app, name="label")
