"""`cvops up / down / status / logs / stack-env`: the local full stack under supervisord."""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
if not console.is_terminal:
    console = Console(width=120)  # logs and CI: keep the URL table on one line per service
err_console = Console(stderr=True)


def _stack():  # noqa: ANN202 - lazy import keeps `cvops --help` fast
    from pydantic import ValidationError

    from cvops.stack.manager import LocalStack
    from cvops.stack.settings import StackSettings

    try:
        settings = StackSettings()
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        err_console.print(
            f"[bold red]error:[/] invalid setting {name} (environment or .env): {first['msg']} "
            f"(got {first.get('input')!r})",
            highlight=False,
        )
        raise typer.Exit(2) from None
    return LocalStack(settings)


def _table(statuses) -> Table:  # noqa: ANN001
    table = Table(title="cvops local stack", title_justify="left")
    for column in ("service", "state", "health", "URL"):
        table.add_column(column)
    for st in statuses:
        health = "[green]ok[/]" if st.healthy else "[red]failing[/]"
        table.add_row(st.title, st.state, health, st.url or "")
    return table


def up(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every health check")] = 300,
) -> None:
    """Start the local full stack and wait until every service is healthy.

    Postgres, MLflow, Prefect server + worker, model service + nginx, web UI, Evidently UI,
    Prometheus + node exporter and Jupyter Lab, under supervisord, state in .cvops/stack."""
    from cvops.runtime import configure_logging
    from cvops.stack.postgres import StackError

    configure_logging()
    stack = _stack()
    started = time.monotonic()
    try:
        statuses = stack.up(timeout_s=timeout, on_progress=lambda m: err_console.print(m))
    except StackError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=False)
        err_console.print("Other services keep running: `cvops status`, `cvops down`.")
        raise typer.Exit(1) from None
    console.print(_table(statuses))
    secrets_file = stack.settings.stack_dir / "secrets.env"
    console.print(
        f"Up in {time.monotonic() - started:.1f} s. Passwords and the admin token: .env, "
        f"else {secrets_file}. cvops commands run here now use this stack "
        "(`cvops stack-env` prints the settings)."
    )


def down() -> None:
    """Stop the local stack; data (databases, models, reports) stays for the next `cvops up`."""
    stack = _stack()
    if stack.supervisor.pid() is None:
        console.print("the stack is not running")
        return
    killed = stack.down()
    if killed:
        console.print(f"stopped; {len(killed)} leftover process(es) had to be killed: {killed}")
    else:
        console.print("stopped; no process left behind")


def status() -> None:
    """Each service's state, health and URL."""
    stack = _stack()
    statuses = stack.status()
    if not statuses:
        console.print("the stack is not running (`cvops up` starts it)")
        raise typer.Exit(3)
    console.print(_table(statuses))
    if not all(st.healthy for st in statuses):
        raise typer.Exit(1)


def logs(
    service: Annotated[str, typer.Argument(help="postgres, mlflow, prefect-server, ...")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing")] = False,
) -> None:
    """Show the log of one service of the stack."""
    stack = _stack()
    path = stack.log_file(service)
    if not path.exists():
        known = sorted(p.stem for p in stack.supervisor.log_dir.glob("*.log"))
        err_console.print(f"no log for '{service}'; known: {', '.join(known) or 'none yet'}")
        raise typer.Exit(2)
    cmd = ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]
    raise typer.Exit(subprocess.call(cmd))


def stack_env() -> None:
    """Print `export` lines pointing cvops, MLflow and Prefect at the running stack."""
    stack = _stack()
    for key, value in stack.client_env().items():
        typer.echo(f"export {key}={shlex.quote(value)}")


def register(app: typer.Typer) -> None:
    """Add the stack commands to the top-level CLI (kept here so cli.py stays small)."""
    app.command()(up)
    app.command()(down)
    app.command()(status)
    app.command()(logs)
    app.command("stack-env")(stack_env)
