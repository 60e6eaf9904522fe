"""Exec a stack program with extra environment read from its private JSON file.

supervisord's `environment=` cannot hold every value (its parser has no escapes, so a value
with both quote kinds is impossible) and would put passwords in a world-readable config. Each
program's variables go to `<stack>/env/<name>.json` (mode 0600) instead; this launcher execs
the real command in the same process, so supervisord's signals reach it directly.

Usage: python -m cvops.stack.launch ENV_JSON -- COMMAND [ARGS...]
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m cvops.stack.launch ENV_JSON -- COMMAND [ARGS...]")
    with open(argv[0], encoding="utf-8") as fh:
        extra = json.load(fh)
    command = argv[2:]
    os.execvpe(command[0], command, {**os.environ, **extra})


if __name__ == "__main__":
    main(sys.argv[1:])
