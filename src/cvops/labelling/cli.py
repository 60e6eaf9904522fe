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


def _setup(config: Path, overrides: dict[str, Any]) -> tuple[Any, Any]:
    """(flow config, labelling config with the command line's overrides)."""
    from cvops.config import ConfigError, LabellingConfig, load_config
    from cvops.runtime import bootstrap_env, configure_logging

    configure_logging()
    bootstrap_env()
    try:
        cfg = load_config(config, check_flow_module=False)
        cfg.require("model")
        data = (cfg.labelling or LabellingConfig()).model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cfg, LabellingConfig.model_validate(data)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
        raise  # unreachable: _fail exits


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
    from cvops.labelling.client import LabelStudioError
    from cvops.labelling.commands import run_push

    cfg, labelling = _setup(config, {"n": n, "strategy": strategy, "random_share": random_share})
    try:
        meta, result = run_push(cfg, labelling)
    except (LabelStudioError, FileNotFoundError, ValueError) as err:
        _fail(str(err), code=1)
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
    from cvops.labelling.commands import run_pull

    cfg, labelling = _setup(config, {})
    try:
        cfg.require("dataset")
        result = run_pull(cfg, labelling)
    except (LabelStudioError, DataVersionError, ValueError) as err:
        _fail(str(err), code=1)
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
