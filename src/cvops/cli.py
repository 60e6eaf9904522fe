"""`cvops` command line. Heavy imports (TensorFlow, Prefect, MLflow) happen inside commands so
that `--help` and config errors answer at once."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def run_config(config_path: Path) -> dict[str, Any]:
    """Validate the config, then hand it to its flow module's `start` (the reference contract)."""
    import importlib

    from cvops.config import ConfigError, load_config, resolve_flow_module

    bootstrap_env()
    configure_logging()
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

    bootstrap_env()
    configure_logging()
    settings = get_settings()
    repo = root / name
    tags = build_demo_repo(
        repo,
        settings.dvc_remote_root / name,
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


@data_app.command("version")
def data_version(
    dataset: Annotated[Path, typer.Argument(help="A DVC dataset repo folder")],
) -> None:
    """Show the dataset's git tag, DVC hash and whether the workspace is dirty."""
    from cvops.data.versioning import current_version

    typer.echo(json.dumps(current_version(dataset).as_dict(), indent=2))


if __name__ == "__main__":
    app()
