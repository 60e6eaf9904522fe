"""Reference-compatible entry point: `python run_flow.py --config configs/full_flow.yaml`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="flow config YAML")
    args = parser.parse_args()

    import typer

    from cvops.cli import run

    try:
        run(args.config)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
