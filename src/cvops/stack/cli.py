"""`cvops up / down / status / logs`: the local full stack under supervisord."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the stack commands to the top-level CLI (kept here so cli.py stays small)."""
