"""Which model every worker serves: a pointer file all workers watch, and per-worker acks.

The reference reloaded only the worker that got `PUT /update_model`. Here that worker loads the
model, publishes a new generation in the pointer, and waits until every live worker has acked
it; the others notice the pointer within `reload_poll_s`, load, swap and ack.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pointer:
    generation: int
    metadata_file: str


@dataclass(frozen=True)
class Ack:
    pid: int
    generation: int
    ok: bool
    detail: str = ""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ModelSync:
    def __init__(self, pointer_path: Path) -> None:
        self.pointer_path = pointer_path
        self.workers_dir = pointer_path.parent / "workers"
        self.workers_dir.mkdir(parents=True, exist_ok=True)

    def read(self) -> Pointer | None:
        try:
            data = json.loads(self.pointer_path.read_text())
            return Pointer(int(data["generation"]), str(data["metadata_file"]))
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def publish(self, metadata_file: str) -> Pointer:
        """Next generation pointing at `metadata_file` (serialised across workers)."""
        lock_path = self.pointer_path.with_suffix(".lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            pointer = Pointer((current.generation if current else 0) + 1, metadata_file)
            _atomic_write(
                self.pointer_path,
                json.dumps({"generation": pointer.generation, "metadata_file": metadata_file}),
            )
        return pointer

    def ack(self, generation: int, ok: bool, detail: str = "") -> None:
        payload = {"pid": os.getpid(), "generation": generation, "ok": ok, "detail": detail}
        _atomic_write(self.workers_dir / str(os.getpid()), json.dumps(payload))

    def leave(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.workers_dir / str(os.getpid())).unlink()

    def acks(self) -> list[Ack]:
        """Acks of live workers (files of dead pids are removed)."""
        out = []
        for path in self.workers_dir.iterdir():
            if not path.name.isdigit():
                continue
            if not _alive(int(path.name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                data = json.loads(path.read_text())
                out.append(
                    Ack(
                        int(data["pid"]),
                        int(data["generation"]),
                        bool(data["ok"]),
                        str(data.get("detail", "")),
                    )
                )
        return out
