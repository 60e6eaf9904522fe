"""Serving benchmark: the reference model service vs `cvops serve`, and the compute floor.

One run, on this machine, loopback only (issue 14, item 1):

1. a temporary central storage with one package of the reference architecture
   (`reference_cnn`, 50x50, the demo's 10 classes), briefly trained on a small demo dataset
   (`--untrained`: an untrained but complete package, faster);
2. a throwaway PostgreSQL 15 cluster on 127.0.0.1 (one database per service);
3. the reference service (`--baseline`, its own app, never imported), then `cvops serve`, one
   after the other so they never share the CPUs, each driven by the same bounded async load
   generator at concurrency 1, 8 and 32 with the same 120x90 JPEG; cvops also at 32 without
   heatmaps when the service supports `POST /predict?heatmaps=false`;
4. after each service's load: every 200 must have its row in its `predictions` table;
5. with no service running (before them and again after them, averaged), the compute floor:
   images/s of the compiled inference step (`LoadedModel.infer`: probs + Grad-CAM + UAE + BBSD
   + hidden) in this process, no HTTP;
6. `--rounds` rounds on the cvops service, each: the floor (service idle), c=1, c=32. The
   targets in the last lines are the medians of the rounds' ratios: the machine's speed drifts
   between phases by more than the margins, and a ratio of two measurements made seconds
   apart drifts much less than one of measurements made a minute apart.

Prints a table and writes `benchmarks/results/serve.md`. Everything it starts (services,
Postgres, temporary folders) is stopped and removed at exit, on errors and Ctrl-C too.

    .venv/bin/python benchmarks/serve.py [--workers 2] [--requests-scale 1] [--skip-reference]
        [--baseline ../shared/baselines/reference_dl_service] [--output PATH] [--untrained]
        [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cvops.background import free_port

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = REPO.parent / "shared" / "baselines" / "reference_dl_service"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "serve.md"
CONFIG = REPO / "configs" / "full_flow.yaml"

LEVELS = (1, 8, 32)
REFERENCE_REQUESTS = {1: 30, 8: 40, 32: 64}  # the reference does about 5 requests/s
CVOPS_REQUESTS = {1: 200, 8: 400, 32: 800}
REFERENCE_WARMUP = {1: 2, 8: 8, 32: 8}  # per level, not counted
CVOPS_WARMUP = {1: 8, 8: 16, 32: 32}
IMAGE_SIZE = (120, 90)  # width, height
ADMIN_TOKEN = "bench-admin-token"
PG_MAX_CONNECTIONS = 1000
ROW_WAIT_S = 30.0
ROUNDS = 7  # of (floor, c=1, c=32): the targets are their medians
TRAIN_PER_CLASS = 80
TRAIN_EPOCHS = 4


# --------------------------------------------------------------------------- processes


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) of every live process;
    field 1 is the parent, 3 the session, 11-14 utime stime cutime cstime (clock ticks)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        yield int(stat.parent.name), text[text.rindex(")") + 2 :].split()


class Service:
    """A server in its own process group (its workers too), logging to a file."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.name, self.cmd, self.cwd, self.env, self.log_path = name, cmd, cwd, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_answering(self, url: str, timeout: float = 240) -> None:
        """Until `url` answers 200; raises (with the log) if it does not or the process exits."""
        if not wait_for(lambda: http_ok(url) or not self.running(), timeout):
            raise self.fail(f"no 200 from {url} in {timeout:.0f} s")
        if not self.running():
            raise self.fail("exited during start-up")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the live processes of its session: the server and its
        workers, not Postgres or the load generator."""
        if self.proc is None:
            return 0.0
        total = 0
        for _, fields in proc_stats():
            if int(fields[3]) == self.proc.pid:  # session id: start_new_session made it ours
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"{self.name}: {why}; its log ends with:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL after 30 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop in 30 s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # workers that outlived the master (orphans) are still in the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (as cvops' tests run one). As root it runs
    as the `postgres` user, which refuses to run as root."""

    def __init__(self, root: Path, max_connections: int = PG_MAX_CONNECTIONS) -> None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not candidates:
            raise RuntimeError("PostgreSQL server binaries not found: make system-deps")
        self.bin = candidates[-1].parent
        self.version = self.bin.parent.name
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.max_connections = max_connections
        self.as_root = os.geteuid() == 0
        self.started = False

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(
            cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd="/", check=False
        )
        if done.returncode:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        self.root.mkdir(parents=True)
        os.chmod(self.root, 0o755)
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self.max_connections}"
        )
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")
        self.started = True

    def stop(self) -> None:
        if not self.started:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-t", "30", "-w", "stop")
        except RuntimeError:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.started = False

    def url(self, database: str, driver: str | None = "psycopg") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url(database, None), autocommit=True, connect_timeout=10) as c:
            cursor = c.execute(sql)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def cpu_seconds(self) -> float:
        """CPU time of the server, its backends and the backends it has reaped."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        return process_tree_cpu(postmaster)

    def create_database(self, name: str) -> str:
        self.query("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)


class OtherCpu:
    """CPU time that programs other than this benchmark (its process, the services' sessions,
    its Postgres) used during a phase, as a share of all cores: how disturbed a measurement
    was. From /proc; processes that end within the phase are not counted."""

    def __init__(self, sessions: set[int], pg: Postgres | None = None) -> None:
        self.sessions = sessions
        self.pg = pg
        self.start = self._snapshot()
        self.started = time.monotonic()

    def _postmaster(self) -> int | None:
        if self.pg is None:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.pg.data / "postmaster.pid").read_text().split()[0])
        return None

    def _snapshot(self) -> dict[tuple[int, int], int]:
        me, postmaster = os.getpid(), self._postmaster()
        ticks = {}
        for pid, fields in proc_stats():
            ppid, session = int(fields[1]), int(fields[3])
            if pid == me or session in self.sessions or postmaster in (pid, ppid):
                continue
            ticks[(pid, int(fields[19]))] = int(fields[11]) + int(fields[12])
        return ticks

    def share(self) -> float:
        """Percent of all cores' time since construction used by other programs."""
        end, elapsed = self._snapshot(), time.monotonic() - self.started
        used = sum(t - self.start.get(key, 0) for key, t in end.items())
        cores = len(os.sched_getaffinity(0))
        return 100 * used / os.sysconf("SC_CLK_TCK") / (elapsed * cores) if elapsed else 0.0


class MachineCpu:
    """What the whole machine did during a phase, from /proc/stat: the CPU time no process of
    this benchmark used (processes that came and went included, unlike `OtherCpu`) and the
    time the hypervisor took from this VM (steal), each as a share of all cores."""

    def __init__(self, ours: Callable[[], float]) -> None:
        self.ours = ours  # CPU seconds so far of this benchmark, its services and Postgres
        self.start = (*self._stat(), ours(), time.monotonic())

    @staticmethod
    def _stat() -> tuple[float, float]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = values
        tick = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / tick, steal / tick

    def shares(self) -> tuple[float, float]:
        """(% of all cores used by others, % stolen) since construction."""
        busy, steal = self._stat()
        ours, now = self.ours(), time.monotonic()
        busy0, steal0, ours0, then = self.start
        capacity = (now - then) * len(os.sched_getaffinity(0)) or float("nan")
        others = max(0.0, (busy - busy0) - (ours - ours0))
        return 100 * others / capacity, 100 * (steal - steal0) / capacity


def process_tree_cpu(root: int) -> float:
    """CPU seconds of a process, its living descendants and the children it has reaped."""
    ticks = 0
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for pid, fields in proc_stats():
        parents[pid] = int(fields[1])
        times[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    for pid, own in times.items():
        ancestor = pid
        while ancestor and ancestor != root:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root:
            ticks += own
    return ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- load generator


@dataclass
class Level:
    """One concurrency level: `requests` sent, latencies of the 200s."""

    concurrency: int
    requests: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    service_cpu_s: float = float("nan")  # CPU of the service's processes during the level

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        """Throughput: responses 200 per second of the level's wall time."""
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.service_cpu_s / self.ok if self.ok else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)


@dataclass
class Answer:
    """What the load generator keeps of one HTTP response."""

    status_code: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection sending a prebuilt multipart upload.

    The generator runs on the same cores as the services, so it must cost little: httpx spent
    about 2-3 ms of CPU per upload here, this about 0.2 ms, which both services get back."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes, timeout: float) -> Answer:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await asyncio.wait_for(self._exchange(raw), timeout)
        except BaseException:
            self.close()  # a half-read answer would poison the next request on this connection
            raise

    async def _exchange(self, raw: bytes) -> Answer:
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            self.close()
        return Answer(status, body)

    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def multipart_request(url: str, image: bytes, params: dict[str, str] | None = None) -> bytes:
    """The bytes of one `POST url` with `image` as the multipart field `file`."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path + ("?" + urllib.parse.urlencode(params) if params else "")
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def load(
    connections: list[Connection],
    raw: bytes,
    concurrency: int,
    requests: int,
    *,
    on_ok: Callable[[Answer], None] | None = None,
    timeout: float = 600.0,
) -> Level:
    """`concurrency` tasks, each on its own keep-alive connection, pull from `requests`
    uploads until none are left."""
    level = Level(concurrency, requests)
    tickets = iter(range(requests))

    async def user(connection: Connection) -> None:
        for _ in tickets:  # shared: each ticket is taken by exactly one task
            started = time.perf_counter()
            try:
                response = await connection.request(raw, timeout)
            except (OSError, EOFError, TimeoutError, ValueError, IndexError) as err:
                level.errors += 1
                level.error_samples.append(f"{type(err).__name__}: {err}"[:200])
                continue
            elapsed_ms = 1000 * (time.perf_counter() - started)
            if response.status_code != 200:
                level.errors += 1
                level.error_samples.append(f"{response.status_code}: {response.text[:200]}")
                continue
            level.latencies_ms.append(elapsed_ms)
            if on_ok is not None:
                on_ok(response)

    started = time.perf_counter()
    await asyncio.gather(*(user(c) for c in connections[: min(concurrency, requests)]))
    level.seconds = time.perf_counter() - started
    return level


async def run_levels(
    url: str,
    image: bytes,
    counts: dict[int, int],
    warmups: dict[int, int],
    on_ok: Callable[[Answer], None] | None = None,
    params: dict[str, str] | None = None,
    service_cpu: Callable[[], float] | None = None,
) -> dict[int, Level]:
    """Each level: its warm-up requests (not counted, their 200s still go to `on_ok`), then
    the measured ones; connections stay open from warm-up to measurement. `service_cpu`: the
    service's CPU seconds so far, read before and after each measured level."""
    results = {}
    parts = urllib.parse.urlsplit(url)
    raw = multipart_request(url, image, params)
    connections = [Connection(parts.hostname or "127.0.0.1", parts.port or 80)]
    try:
        for c, n in counts.items():
            connections += [
                Connection(*connections[0].address()) for _ in range(c - len(connections))
            ]
            warm = await load(connections, raw, c, warmups.get(c, 0), on_ok=on_ok)
            cpu_before = service_cpu() if service_cpu else float("nan")
            level = await load(connections, raw, c, n, on_ok=on_ok)
            if service_cpu:
                level.service_cpu_s = service_cpu() - cpu_before
            results[c] = level
            extra = f", warm-up errors {warm.errors}" if warm.errors else ""
            cpu = f", service CPU {level.cpu_ms_per_request:.2f} ms/request" if service_cpu else ""
            print(
                f"  c={c:<3} {level.ok}/{n} ok in {level.seconds:6.1f} s: {level.rps:7.1f} req/s,"
                f" p50 {level.p50:8.0f} ms, p99 {level.p99:8.0f} ms, errors {level.errors}"
                f"{extra}{cpu}"
            )
            for sample in (level.error_samples + warm.error_samples)[:3]:
                print(f"    error: {sample}")
            level.errors += warm.errors
    finally:
        for connection in connections:
            connection.close()
    return results


# --------------------------------------------------------------------------- inputs


def cached_package(work: Path | None, prefix: str) -> tuple[Path, Path, Package]:
    """(work folder, central storage, package) for the diagnostic scripts: the package is
    built (and trained) once per work folder and reused by later runs given the same one."""
    work = work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # Postgres runs as `postgres` under it when we are root
    storage, package_file = work / "central_storage", work / "package.json"
    if not package_file.exists():
        package = build_package(storage, work / "build", untrained=False)
        package_file.write_text(json.dumps(package.__dict__))
    return work, storage, Package(**json.loads(package_file.read_text()))


def demo_image() -> bytes:
    """A deterministic demo-like 120x90 JPEG: demo test image 0 of `star` (seed 0), rendered
    by the demo generator at 90-120 px and resized to exactly 120x90."""
    from PIL import Image

    from cvops.data.demo import JPEG_QUALITY, render, spec_for

    pixels, _ = render(spec_for(0, "test", "star", 0, min_size=90, max_size=120))
    picture = Image.fromarray(pixels, mode="RGB")
    if picture.size != IMAGE_SIZE:
        picture = picture.resize(IMAGE_SIZE, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


@dataclass
class Package:
    metadata_file: str
    model_name: str
    description: str


def build_package(storage_root: Path, work: Path, untrained: bool) -> Package:
    """The full flow's model section (reference_cnn, 50x50, 10 demo classes) as a complete
    package in `storage_root`: trained briefly on a small demo dataset, or untrained."""
    import yaml

    from cvops.config import parse_config
    from cvops.data.demo import generate_demo_dataset
    from cvops.model.train import build_detectors, fit_model, load_splits, save_package
    from cvops.storage import CentralStorage, ModelMetadata, utc_now

    data = yaml.safe_load(CONFIG.read_text())
    data["model"].update(backbone="reference_cnn", weights="none", save_dir=str(work / "save"))
    data["model"]["drift_detection"]["reference_data_n_sample"] = 1000
    data["train"]["hparams"]["epochs"] = 1 if untrained else TRAIN_EPOCHS
    cfg = parse_config(data, str(CONFIG), check_flow_module=False)
    assert cfg.model is not None
    per_class = 4 if untrained else TRAIN_PER_CLASS
    generate_demo_dataset(work / "dataset", n_train_per_class=per_class, n_test_per_class=1)
    splits = load_splits(cfg, work / "dataset")
    if untrained:
        import keras

        from cvops.model.build import build_model

        keras.utils.set_random_seed(cfg.seed)
        model = build_model((50, 50), len(cfg.model.classes), backbone="reference_cnn")
        description = "untrained (random weights) but complete"
    else:
        model, history = fit_model(cfg, splits)
        val = history.get("val_accuracy", [float("nan")])
        description = (
            f"trained briefly: {TRAIN_EPOCHS} epochs on {len(splits.train)} demo images "
            f"({per_class} per class, validation accuracy {max(val):.2f} on {len(splits.val)})"
        )
    uae, bbsd, ref = build_detectors(cfg, model, splits)
    name = cfg.model.model_name
    names = CentralStorage.artifact_names(name, cfg.model.drift_detection)
    files = save_package(cfg.model.save_dir, name, names, model, uae, bbsd, ref)
    metadata = ModelMetadata(
        **cfg.model.model_dump(mode="json", exclude={"save_dir"}), **names, created_on=utc_now()
    )
    meta_path = CentralStorage(storage_root).publish(files, metadata)
    return Package(meta_path.name, name, description)


# --------------------------------------------------------------------------- the two services


@dataclass
class Round:
    """One round of the targets: the compute floor, then c=1, then c=32, back to back, so each
    ratio compares the service with the step measured at the same moment of the machine."""

    floor: Floor
    c1: Level
    c32: Level
    service_idle_cpu: float  # % of all cores the idle service used while the floor ran
    other_cpu: float = float("nan")  # % of all cores used by anything else during the round
    steal: float = float("nan")  # % of all cores' time the hypervisor took

    @property
    def p50_ratio(self) -> float:
        return self.c1.p50 / self.floor.ms_one_image

    @property
    def share(self) -> float:
        return 100 * self.c32.rps / self.floor.images_per_s[32]


@dataclass
class ServiceRun:
    label: str
    levels: dict[int, Level]
    rows: str = ""
    rows_ok: bool = False
    notes: list[str] = field(default_factory=list)
    no_heatmaps: Level | None = None
    no_heatmaps_note: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    other_cpu: float = float("nan")
    rounds: list[Round] = field(default_factory=list)

    @property
    def errors(self) -> int:
        total = sum(level.errors for level in self.levels.values())
        total += sum(r.c1.errors + r.c32.errors for r in self.rounds)
        return total + (self.no_heatmaps.errors if self.no_heatmaps else 0)


def log_findings(service: Service, patterns: tuple[str, ...]) -> list[str]:
    text = service.log_tail(10_000_000)
    return [f"{p!r} x{text.count(p)}" for p in patterns if p in text]


def run_reference(
    baseline: Path,
    storage_root: Path,
    pg: Postgres,
    tmp: Path,
    pkg: Package,
    image: bytes,
    scale: float,
) -> ServiceRun:
    app_dir = baseline / "app"
    if not (app_dir / "start_service.sh").is_file():
        raise RuntimeError(f"no reference service in {baseline} (expected app/start_service.sh)")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CENTRAL_STORAGE_PATH": str(storage_root),
        "DB_CONNECTION_URL": pg.create_database("reference"),
        "GUNICORN_CMD_ARGS": "--timeout 0",
        "BIND": f"127.0.0.1:{port}",
        "GUNICORN": str(Path(sys.executable).parent / "gunicorn"),
    }
    service = Service("reference", ["bash", "start_service.sh"], app_dir, env, tmp / "ref.log")
    with contextlib.ExitStack() as stack:
        service.start()
        stack.callback(service.stop)
        started = time.monotonic()
        service.wait_answering(f"{base}/health_check")
        put = httpx.put(f"{base}/update_model/{pkg.metadata_file}", timeout=300)
        if put.status_code != 200:
            raise service.fail(f"PUT /update_model answered {put.status_code}: {put.text}")
        print(f"reference service ready in {time.monotonic() - started:.0f} s on {base}")
        counts = {c: max(1, round(n * scale)) for c, n in REFERENCE_REQUESTS.items()}
        oks = 0

        def count_ok(_: Answer) -> None:
            nonlocal oks
            oks += 1

        assert service.proc is not None
        others = OtherCpu({service.proc.pid}, pg)
        levels = asyncio.run(
            run_levels(
                f"{base}/predict",
                image,
                counts,
                REFERENCE_WARMUP,
                on_ok=count_ok,
                service_cpu=service.cpu_seconds,
            )
        )
        run = ServiceRun("reference service (1 worker, its design)", levels)
        run.other_cpu = others.share()
        print(f"  other programs used {run.other_cpu:.0f}% of the CPUs meanwhile")

        def rows() -> int:
            return pg.query("reference", "SELECT count(*) FROM predictions")[0][0]

        waited = time.monotonic()
        wait_for(lambda: rows() >= oks, ROW_WAIT_S, 0.5)
        found = rows()
        run.rows_ok = found == oks
        run.rows = (
            f"reference: {found} rows in `predictions` for {oks} responses 200 (warm-ups "
            f"included): {'counts match' if run.rows_ok else 'COUNTS DIFFER'} "
            f"(after {time.monotonic() - waited:.1f} s; the reference has no prediction id in "
            "its response, so only counts can be compared)"
        )
        run.notes = log_findings(
            service, ("Booting worker", "WORKER TIMEOUT", "Worker exited", "Traceback")
        )
    return run


def run_cvops(
    storage_root: Path,
    pg: Postgres,
    tmp: Path,
    pkg: Package,
    image: bytes,
    scale: float,
    workers: int,
    extra_env: dict[str, str] | None = None,
    *,
    name: str = "cvops",
    variant: bool = False,
    floor_probe: FloorProbe | None = None,
    rounds: int = 0,
) -> ServiceRun:
    """`cvops serve` through every level, into database `name`, then `?heatmaps=false` at 32
    and `rounds` rounds of the targets (`Round`, with `floor_probe` for the floor) unless this is a
    `variant` of the settings (compared at 32: it runs the same levels before, because a
    fresh worker's first batches of each size cost more: its kernels warm up)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state_dir = tmp / f"{name}-state"
    database = name
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVOPS_")}
    env.update(
        CENTRAL_STORAGE_PATH=str(storage_root),
        CVOPS_STATE_DIR=str(state_dir),
        CVOPS_SERVICE_ADMIN_TOKEN=ADMIN_TOKEN,
        CVOPS_SERVICE_DB_URL=pg.create_database(database),
    )
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "cvops.cli", "serve", "--workers", str(workers), "--port"]
    cmd += [str(port), "--model", pkg.metadata_file]
    # cwd: a folder without .env, so only the variables above configure the service
    cwd = tmp / f"{name}-cwd"
    cwd.mkdir()
    service = Service(name, cmd, cwd, env, tmp / f"{name}.log")
    with contextlib.ExitStack() as stack:
        service.start()
        stack.callback(service.stop)
        started = time.monotonic()
        service.wait_answering(f"{base}/ready")
        # /ready answers once one worker has loaded the model: wait until every worker says
        # in the model-state table that it serves it
        serving = "SELECT count(*) FROM replicas WHERE ok AND generation >= 1"
        if not wait_for(lambda: pg.query(database, serving)[0][0] >= workers, 120):
            print(f"  note: fewer than {workers} workers serve the model after 120 s; measuring")
        print(f"cvops service ready in {time.monotonic() - started:.0f} s on {base}")
        ids: list[str] = []
        timings: list[dict[str, float]] = []

        def collect(response: Answer) -> None:
            body = response.json()
            ids.append(body["prediction_id"])
            if isinstance(body.get("timings_ms"), dict):
                timings.append(body["timings_ms"])

        counts = {c: max(1, round(n * scale)) for c, n in CVOPS_REQUESTS.items()}
        assert service.proc is not None
        others = OtherCpu({service.proc.pid}, pg)
        levels = asyncio.run(
            run_levels(
                f"{base}/predict", image, counts, CVOPS_WARMUP, collect, None, service.cpu_seconds
            )
        )
        run = ServiceRun(f"cvops serve --workers {workers}", levels)
        if variant:
            run.other_cpu = others.share()
            run.rows, run.rows_ok = check_cvops_rows(pg, ids, database)
            run.notes = log_findings(service, ("WORKER TIMEOUT", "Worker exited", "Traceback"))
            return run
        n_c1 = counts[1] + CVOPS_WARMUP[1]
        c1 = timings[CVOPS_WARMUP[1] : n_c1]  # the measured c=1 requests
        run.timings_ms = (
            {k: statistics.median(t.get(k, 0.0) for t in c1) for k in c1[0]} if c1 else {}
        )

        # heatmap-free mode (issue 14 item 4): supported when the probe's heatmap is absent
        params = {"heatmaps": "false"}
        probe = httpx.post(
            f"{base}/predict",
            params=params,
            files={"file": ("image.jpg", image, "image/jpeg")},
            timeout=60,
        )
        if probe.status_code == 200:
            collect(probe)
            if probe.json().get("raw_hm_img") is None:
                print("cvops, POST /predict?heatmaps=false:")
                no_hm = asyncio.run(
                    run_levels(
                        f"{base}/predict",
                        image,
                        {32: counts[32]},
                        {32: CVOPS_WARMUP[32]},
                        collect,
                        params,
                        service.cpu_seconds,
                    )
                )
                run.no_heatmaps = no_hm[32]
            else:
                run.no_heatmaps_note = "n/a (?heatmaps=false still returns raw_hm_img)"
        else:
            run.no_heatmaps_note = f"n/a (?heatmaps=false answered {probe.status_code})"
        if run.no_heatmaps_note:
            print(f"cvops without heatmaps: {run.no_heatmaps_note}")
        for number in range(1, rounds + 1 if floor_probe else 1):
            assert floor_probe is not None
            machine = MachineCpu(
                lambda: time.process_time() + service.cpu_seconds() + pg.cpu_seconds()
            )
            idle_before, idle_started = service.cpu_seconds(), time.monotonic()
            floor = floor_probe.measure(with_properties=False)
            idle = (service.cpu_seconds() - idle_before) / (time.monotonic() - idle_started)
            print(
                f"round {number}/{rounds}: floor batch 1 {floor.ms_one_image:.2f} ms, batch 32 "
                f"{floor.images_per_s[32]:.0f} img/s"
            )
            levels = asyncio.run(
                run_levels(
                    f"{base}/predict",
                    image,
                    {1: counts[1], 32: counts[32]},
                    {1: CVOPS_WARMUP[1], 32: CVOPS_WARMUP[32]},
                    collect,
                    None,
                    service.cpu_seconds,
                )
            )
            cores = len(os.sched_getaffinity(0))
            other, steal = machine.shares()
            run.rounds.append(Round(floor, levels[1], levels[32], 100 * idle / cores, other, steal))
            print(
                f"  p50 at c=1 / one-image step {run.rounds[-1].p50_ratio:.2f}x, c=32 share of "
                f"the floor {run.rounds[-1].share:.1f}%; others used {other:.1f}% of the "
                f"cores, steal {steal:.1f}%"
            )
        run.other_cpu = others.share()
        print(f"  other programs used {run.other_cpu:.0f}% of the CPUs meanwhile")

        run.rows, run.rows_ok = check_cvops_rows(pg, ids, database)
        run.notes = log_findings(service, ("WORKER TIMEOUT", "Worker exited", "Traceback"))
    return run


def check_cvops_rows(pg: Postgres, ids: list[str], database: str = "cvops") -> tuple[str, bool]:
    """Every prediction_id answered with a 200 is in `predictions`, exactly once (the service
    spools records and writes them asynchronously: wait up to ROW_WAIT_S for them)."""
    wanted = set(ids)
    sql = "SELECT id, count(*) FROM predictions GROUP BY id"
    state: dict[str, int] = {}

    def arrived() -> bool:
        state.clear()
        state.update(pg.query(database, sql))
        return wanted <= state.keys()

    started = time.monotonic()
    wait_for(arrived, ROW_WAIT_S, 0.5)
    missing = len(wanted - state.keys())
    repeated_rows = sum(1 for i in wanted if state.get(i, 0) > 1)
    repeated_ids = len(ids) - len(wanted)
    extra = len(state.keys() - wanted)
    ok = not (missing or repeated_rows or repeated_ids or extra)
    text = (
        f"{database}: {len(wanted) - missing}/{len(ids)} prediction_ids of responses 200 (warm-ups "
        f"included) found in `predictions`; missing {missing}, ids with more than one row "
        f"{repeated_rows}, ids answered twice {repeated_ids}, rows of no response {extra} "
        f"({'every 200 has its row, exactly once' if ok else 'ROW CHECK FAILED'}; "
        f"after {time.monotonic() - started:.1f} s)"
    )
    return text, ok


# --------------------------------------------------------------------------- compute floor


@dataclass
class Floor:
    images_per_s: dict[int, float]
    ms_one_image: float
    other_cpu: float
    property_us: float = float("nan")  # image properties of one model input (issue 16)
    parts: tuple[Floor, ...] = ()  # the measurements this one averages


def mean_floor(*floors: Floor) -> Floor:
    """The floor measured before and after the services, averaged: the machine's speed drifts
    within a run (the batch-1 step moved between 3.1 and 4.7 ms from run to run here), and
    the services ran in between."""
    return Floor(
        {b: statistics.mean(f.images_per_s[b] for f in floors) for b in floors[0].images_per_s},
        statistics.mean(f.ms_one_image for f in floors),
        max(f.other_cpu for f in floors),
        statistics.mean(f.property_us for f in floors),
        floors,
    )


class FloorProbe:
    """The compiled step of the served package in this process, loaded once and measured as
    often as asked: before the services, in every round next to the service's load, after."""

    def __init__(self, storage_root: Path, pkg: Package, image: bytes) -> None:
        import tensorflow as tf

        from cvops.model.preprocess import preprocess_image
        from cvops.service.model_store import load_model
        from cvops.storage import CentralStorage

        self.loaded = load_model(CentralStorage(storage_root), pkg.metadata_file)
        self.x = preprocess_image(tf.constant(image), self.loaded.size).numpy()
        self.image = image

    def measure(self, with_properties: bool = True) -> Floor:
        """Images/s of the compiled step at batch 1, 8 and 32 (median of 7 repeats after
        warm-up); the model input is the benchmark image preprocessed as the service does."""
        rates: dict[int, float] = {}
        seconds_per_call: dict[int, float] = {}
        others = OtherCpu(set())
        for batch, calls in ((1, 60), (8, 12), (32, 4)):
            inputs = np.repeat(self.x[None], batch, axis=0)
            for _ in range(max(3, calls // 4)):
                self.loaded.infer(inputs)
            per_call = []
            for _ in range(7):
                started = time.perf_counter()
                for _ in range(calls):
                    self.loaded.infer(inputs)
                per_call.append((time.perf_counter() - started) / calls)
            seconds_per_call[batch] = statistics.median(per_call)
            rates[batch] = batch / seconds_per_call[batch]
        properties = property_cost_us(self.x, self.image) if with_properties else float("nan")
        return Floor(rates, 1000 * seconds_per_call[1], others.share(), properties)


def property_cost_us(x: np.ndarray, image: bytes) -> float:
    """CPU microseconds of the image properties the service's flusher measures per prediction
    (`input_properties` of the model input), median of repeats in this process."""
    from PIL import Image

    from cvops.data.properties import input_properties

    width, height = Image.open(io.BytesIO(image)).size
    for _ in range(50):
        input_properties(x, width, height)
    per_call = []
    for _ in range(7):
        started = time.process_time()
        for _ in range(200):
            input_properties(x, width, height)
        per_call.append((time.process_time() - started) / 200)
    return 1e6 * statistics.median(per_call)


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def table(runs: list[ServiceRun]) -> list[str]:
    lines = [
        "| | c=1 req/s | p50 ms | c=8 req/s | c=32 req/s | p99 ms at c=32 | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lv = run.levels
        lines.append(
            f"| {run.label} | {fmt(lv[1].rps)} | {fmt(lv[1].p50, 0)} | {fmt(lv[8].rps)} | "
            f"{fmt(lv[32].rps)} | {fmt(lv[32].p99, 0)} | {run.errors} |"
        )
        if run.label.startswith("cvops"):
            hm = run.no_heatmaps
            if hm is not None:
                lines.append(
                    f"| {run.label}, `?heatmaps=false` | | | | {fmt(hm.rps)} | "
                    f"{fmt(hm.p99, 0)} | {hm.errors} |"
                )
            else:
                lines.append(f"| {run.label}, `?heatmaps=false` | | | | n/a | n/a | |")
    return lines


def rounds_section(cv: ServiceRun, ref: ServiceRun | None) -> list[str]:
    """Every round of the targets and their medians, which the last lines report."""
    if not cv.rounds:
        return []
    lines = [
        "## The targets, in rounds",
        "",
        f"After the levels above, {len(cv.rounds)} rounds on the same running service, each: the "
        "compute floor in this process (the service idle), then c=1, then c=32 (with their "
        "warm-ups). Each ratio compares the service with the step measured moments before it, "
        "so drift of the machine's speed between phases (the one-image step moved between 2.9 "
        "and 4.7 ms from run to run here) moves both sides; the last lines report the medians "
        "of the rounds. Others' CPU: what no process of this benchmark, its service or its "
        "Postgres used, from /proc/stat (processes that came and went included); steal: time "
        "the hypervisor took from this machine. A round with either well above zero was "
        "disturbed.",
        "",
        "| round | floor batch 1 ms | floor batch 32 img/s | c=1 p50 ms | p50 / step | c=32 "
        "req/s | share of floor | x reference | c=32 p99 ms | errors | idle service CPU | "
        "others' CPU | steal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref32 = ref.levels[32].rps if ref else 0.0

    def times_ref(rps: float) -> str:
        return f"{rps / ref32:.1f}x" if ref32 else "n/a"

    for number, r in enumerate(cv.rounds, 1):
        lines.append(
            f"| {number} | {r.floor.ms_one_image:.2f} | {r.floor.images_per_s[32]:.0f} | "
            f"{r.c1.p50:.1f} | {r.p50_ratio:.2f}x | {fmt(r.c32.rps)} | {r.share:.1f}% | "
            f"{times_ref(r.c32.rps)} | {fmt(r.c32.p99, 0)} | {r.c1.errors + r.c32.errors} | "
            f"{r.service_idle_cpu:.1f}% | {r.other_cpu:.1f}% | {r.steal:.1f}% |"
        )
    median = statistics.median
    c32 = median(r.c32.rps for r in cv.rounds)
    lines += [
        f"| median | {median(r.floor.ms_one_image for r in cv.rounds):.2f} | "
        f"{median(r.floor.images_per_s[32] for r in cv.rounds):.0f} | "
        f"{median(r.c1.p50 for r in cv.rounds):.1f} | "
        f"{median(r.p50_ratio for r in cv.rounds):.2f}x | {fmt(c32)} | "
        f"{median(r.share for r in cv.rounds):.1f}% | {times_ref(c32)} | | | | | |",
        "",
        f"Targets met in how many rounds: p50 at c=1 <= 2x the step "
        f"{sum(r.p50_ratio <= 2 for r in cv.rounds)}/{len(cv.rounds)}, c=32 >= 50% of the floor "
        f"{sum(r.share >= 50 for r in cv.rounds)}/{len(cv.rounds)}, >= 30x the reference "
        f"{sum(bool(ref32) and r.c32.rps >= 30 * ref32 for r in cv.rounds)}/{len(cv.rounds)}.",
        "",
    ]
    return lines


def levels_table(runs: list[ServiceRun]) -> list[str]:
    lines = [
        "| service | concurrency | requests | ok | errors | seconds | req/s | p50 ms | p99 ms "
        "| service CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        extra = [(f"{run.label}, `?heatmaps=false`", run.no_heatmaps)] if run.no_heatmaps else []
        for label, lv in [*((run.label, lv) for lv in run.levels.values()), *extra]:
            lines.append(
                f"| {label} | {lv.concurrency} | {lv.requests} | {lv.ok} | {lv.errors} | "
                f"{lv.seconds:.1f} | {fmt(lv.rps)} | {fmt(lv.p50, 0)} | {fmt(lv.p99, 0)} | "
                f"{fmt(lv.cpu_ms_per_request, 2)} |"
            )
    return lines


def autogroup_enabled() -> bool:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    return False


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cvops_source() -> str:
    """Which cvops was measured: this checkout (its commit, and whether the service code has
    uncommitted changes) or another source tree on PYTHONPATH (e.g. a `git archive` of an
    earlier commit, to measure a "before")."""
    import cvops

    src = Path(cvops.__file__).resolve().parents[1]
    if src != REPO / "src":
        return f"cvops imported from {src} (not this checkout)"

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src/cvops/service")
    return f"cvops of this checkout at {sha}" + (
        " + uncommitted changes in src/cvops/service" if dirty else ""
    )


def floor_drift(floor: Floor) -> list[str]:
    if len(floor.parts) != 2:
        return []
    before, after = floor.parts
    drift = 100 * (after.images_per_s[32] / before.images_per_s[32] - 1)
    return [
        f"- before / after the services: batch 1 {before.ms_one_image:.2f} / "
        f"{after.ms_one_image:.2f} ms, batch 32 {before.images_per_s[32]:.0f} / "
        f"{after.images_per_s[32]:.0f} img/s ({drift:+.0f}%: how much the machine's speed "
        "drifted within this run)"
    ]


def property_section(cv: ServiceRun, floor: Floor, no_props: ServiceRun | None) -> list[str]:
    """What measuring image properties per prediction (issue 16: drift causes) costs the
    service at concurrency 32, two ways: the measured function's CPU against the service's CPU
    per request, and a second service with properties off."""
    on = cv.levels[32]
    lines = ["## Cost of the image properties (drift causes)", ""]
    in_process = floor.property_us / 1000 / on.cpu_ms_per_request
    lines.append(
        f"- in process: `input_properties` of the benchmark image's model input takes "
        f"{floor.property_us:.0f} us of CPU; the service spent {on.cpu_ms_per_request:.2f} ms "
        f"of CPU per request at c=32, so properties are {100 * in_process:.1f}% of it (the "
        "service is CPU-bound at c=32: its throughput share is the same)"
    )
    share = in_process
    if no_props is not None and 32 in no_props.levels:
        off = no_props.levels[32]
        delta = on.cpu_ms_per_request - off.cpu_ms_per_request
        lines.append(
            f"- a second `cvops serve` with `CVOPS_SERVICE_PROPERTY_BUFFER_MB=0` (properties "
            f"off), c=32, {off.requests} requests: {fmt(off.rps)} req/s and "
            f"{off.cpu_ms_per_request:.2f} ms of service CPU per request, against "
            f"{fmt(on.rps)} req/s and {on.cpu_ms_per_request:.2f} ms with them: "
            f"{delta:+.2f} ms per request ({100 * delta / on.cpu_ms_per_request:+.1f}%). Two "
            "services run one after the other differ by more than the properties cost on a "
            "shared machine, so the in-process figure is the one the ceiling is checked on"
        )
    lines += [
        "",
        f"image property cost at concurrency 32: {100 * share:.1f}% of CPU per request",
        "",
    ]
    return lines


def report(
    args: argparse.Namespace,
    pkg: Package,
    image: bytes,
    runs: list[ServiceRun],
    floor: Floor,
    setup_notes: list[str],
    pg_version: str,
    seconds: float,
    no_props: ServiceRun | None = None,
) -> str:
    ref = next((r for r in runs if r.label.startswith("reference")), None)
    cv = next(r for r in runs if r.label.startswith("cvops"))
    if cv.rounds:  # the targets: medians of the rounds, each against its own floor
        cv32 = statistics.median(r.c32.rps for r in cv.rounds)
        share = statistics.median(r.share for r in cv.rounds)
        p50_ratio = statistics.median(r.p50_ratio for r in cv.rounds)
    else:
        cv32 = cv.levels[32].rps
        share = 100 * cv32 / floor.images_per_s[32]
        p50_ratio = cv.levels[1].p50 / floor.ms_one_image
    ratio = f"{cv32 / ref.levels[32].rps:.1f}x" if ref and ref.levels[32].rps else "n/a"
    cores = len(os.sched_getaffinity(0))
    import tensorflow as tf

    ref_counts = "/".join(
        str(max(1, round(n * args.requests_scale))) for n in REFERENCE_REQUESTS.values()
    )
    cv_counts = "/".join(
        str(max(1, round(n * args.requests_scale))) for n in CVOPS_REQUESTS.values()
    )
    out = [
        "# Serving benchmark: reference service vs `cvops serve`",
        "",
        f"Written by `benchmarks/serve.py` (`make bench-serve`) on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {cvops_source()}; the whole run took "
        f"{seconds:.0f} s. One run: the services one after the other (never at the same time), "
        "and the compute floor before and after them, with no service running; then, on the "
        "cvops service, rounds of (floor, c=1, c=32) whose medians are the targets in the last "
        "lines. Absolute numbers depend on the machine; the ratios much less.",
        "",
        "## Setup",
        "",
        f"- machine: {cores} CPU cores ({cpu_model()}), Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}",
        f"- model: `{pkg.model_name}`, `model.backbone: reference_cnn` (the architecture both "
        f"services can run), 50x50 input, the demo's 10 classes, {pkg.description}; one "
        "package (model, UAE, BBSD, reference data, metadata) in a temporary central storage, "
        "served by both",
        f"- image: the same {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG for every request ({len(image)} "
        "bytes; demo test image `star` 0 of seed 0, rendered by `cvops.data.demo`), "
        "`POST /predict` multipart",
        (
            f"- reference: `{args.baseline_label}` (`start_service.sh`: 1 gunicorn worker, its "
            "design), model set with `PUT /update_model`"
            if not args.skip_reference
            else "- reference: left out (`--skip-reference`)"
        ),
        f"- cvops: `python -m cvops.cli serve --workers {args.workers}`, "
        + (
            "settings changed: " + ", ".join(f"`{k}={v}`" for k, v in args.cvops_env.items())
            if args.cvops_env
            else "default service settings"
        )
        + " (`CVOPS_SERVICE_DB_URL`, `CVOPS_STATE_DIR`, `CVOPS_SERVICE_ADMIN_TOKEN` set)",
        "- database: one throwaway PostgreSQL "
        f"{pg_version} cluster on 127.0.0.1 started by the script, one database per service",
        "- load: a minimal asyncio HTTP/1.1 client (prebuilt multipart request, one keep-alive "
        "connection per task, 600 s timeout; ~0.2 ms CPU per request, httpx cost ~2-3 ms on "
        "the same cores), N tasks pulling from a fixed number of requests; requests per level "
        f"(c=1/8/32): reference {ref_counts}, cvops {cv_counts} (and {cv_counts.split('/')[-1]} "
        "without heatmaps); warm-up requests per level, not counted: reference "
        f"{'/'.join(map(str, REFERENCE_WARMUP.values()))}, cvops "
        f"{'/'.join(map(str, CVOPS_WARMUP.values()))}",
        "- req/s = responses 200 per second of the level's wall time; latency from sending a "
        "request to its full response; errors = non-200 answers and exceptions, warm-ups "
        "included",
        "",
        "## Results",
        "",
        *table(runs),
        "| compiled step in process, no HTTP (probs + Grad-CAM + UAE + BBSD + hidden) | "
        f"batch 1: {floor.ms_one_image:.1f} ms | | batch 8: {floor.images_per_s[8]:.0f} img/s | "
        f"batch 32: {floor.images_per_s[32]:.0f} img/s | | |",
        "",
        *rounds_section(cv, ref),
        "Every level:",
        "",
        *levels_table(runs + ([no_props] if no_props else [])),
        "",
        "## Compute floor (the compiled inference step in the benchmark process, no HTTP)",
        "",
        "`cvops.service.model_store.load_model` on the same package, `LoadedModel.infer` on the "
        "benchmark image preprocessed as the service does; median of 7 repeats after warm-up, "
        "no service running; measured before the services and again after them, and the two "
        "averaged (the ratios below use the average).",
        "",
        f"- batch 1: {floor.ms_one_image:.2f} ms per image ({floor.images_per_s[1]:.0f} img/s)",
        f"- batch 8: {floor.images_per_s[8]:.0f} img/s",
        f"- batch 32: {floor.images_per_s[32]:.0f} img/s",
        *floor_drift(floor),
        "",
    ]
    if cv.timings_ms:
        stages = ", ".join(f"{k} {v:.1f} ms" for k, v in cv.timings_ms.items())
        out += [f"cvops server-side `timings_ms` at c=1 (median): {stages}.", ""]
    out += property_section(cv, floor, no_props)
    out += ["## Every 200 has its row in `predictions`", ""]
    out += [f"- {run.rows}" for run in runs + ([no_props] if no_props else [])]
    out += [
        "",
        "## Settings that differ from the reference's defaults",
        "",
        "Both from the reference's README; without them it does not finish the benchmark:",
        "",
        "- gunicorn `--timeout 0` (`GUNICORN_CMD_ARGS`): with the default 30 s the reference's "
        "worker is killed at concurrency 8, because inference blocks its event loop, and the "
        "restarted worker has no model.",
        f"- PostgreSQL `max_connections={PG_MAX_CONNECTIONS}`: the reference creates a DB engine "
        "per request in background tasks and leaks their connections until Postgres refuses "
        "clients. cvops runs against the same cluster (it needs neither setting).",
        "",
        "## Log findings",
        "",
    ]
    for run in runs:
        found = ", ".join(run.notes) if run.notes else "nothing"
        out.append(f"- {run.label}: {found}")
    if ref:
        out.append(
            "  (the reference logs one 'Booting worker' at start; more would be worker restarts)"
        )
    phases = [(f"{run.label.split(' (')[0]} load", run.other_cpu) for run in runs]
    phases.append(("compute floor", floor.other_cpu))
    out += [
        "",
        "## Other programs on the machine",
        "",
        "This benchmark does not stop other programs. CPU time they used during each phase, as "
        "a share of all cores (from /proc): "
        + ", ".join(f"{name} {share:.0f}%" for name, share in phases)
        + f". {'; '.join(setup_notes)}.",
    ]
    if autogroup_enabled():
        out.append(
            "The kernel's autogroup scheduling is on: a program started with `nice` in another "
            "session still gets a full share of the CPUs against this benchmark's processes."
        )
    out += [
        "",
        f"p50 at c=1 / one-image compute: {p50_ratio:.1f}x",
        f"throughput ratio at concurrency 32: {ratio}",
        f"share of compute floor at concurrency 32: {share:.1f}%",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="cvops serve --workers")
    parser.add_argument(
        "--requests-scale", type=float, default=1.0, help="multiply every level's request count"
    )
    parser.add_argument(
        "--skip-reference", action="store_true", help="leave the reference service out"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results markdown")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=DEFAULT_BASELINE,
        help="the reference service folder (with app/start_service.sh)",
    )
    parser.add_argument(
        "--cvops-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a service setting for cvops (e.g. CVOPS_SERVICE_SPOOL_FSYNC=false); repeatable",
    )
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="serve an untrained (but complete) package instead of training one briefly",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help="rounds of (floor, c=1, c=32) the targets are the medians of",
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.requests_scale <= 0 or args.rounds < 1:
        parser.error("--workers, --requests-scale and --rounds must be positive")
    if any("=" not in item for item in args.cvops_env):
        parser.error("--cvops-env takes KEY=VALUE")
    args.cvops_env = dict(item.split("=", 1) for item in args.cvops_env)
    args.baseline = args.baseline.resolve()
    args.baseline_label = os.path.relpath(args.baseline, REPO)
    return args


@contextlib.contextmanager
def temp_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="cvops-bench-serve-"))
    os.chmod(root, 0o755)  # Postgres runs as `postgres` under it when we are root
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_reference and not (args.baseline / "app" / "start_service.sh").is_file():
        print(f"no reference service in {args.baseline}: --baseline DIR or --skip-reference")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    began = time.monotonic()
    setup_notes = [f"Load average at the start {os.getloadavg()[0]:.2f}"]
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(temp_root())
        storage_root = tmp / "central_storage"
        print(f"Building the package in {tmp} ...")
        t = time.monotonic()
        pkg = build_package(storage_root, tmp / "build", args.untrained)
        print(f"package {pkg.metadata_file}: {pkg.description} ({time.monotonic() - t:.0f} s)")
        image = demo_image()

        print("compute floor, before the services ...")
        probe = FloorProbe(storage_root, pkg, image)
        floor_before = probe.measure()
        pg = Postgres(tmp / "postgres")
        stack.callback(pg.stop)
        pg.start()
        print(
            f"PostgreSQL {pg.version} on 127.0.0.1:{pg.port}, max_connections={pg.max_connections}"
        )

        runs: list[ServiceRun] = []
        if not args.skip_reference:
            print("reference service:")
            runs.append(
                run_reference(args.baseline, storage_root, pg, tmp, pkg, image, args.requests_scale)
            )
        cvops = functools.partial(
            run_cvops, storage_root, pg, tmp, pkg, image, args.requests_scale, args.workers
        )
        print(f"cvops serve --workers {args.workers}:")
        runs.append(cvops(args.cvops_env, floor_probe=probe, rounds=args.rounds))
        print("cvops serve, image properties off (CVOPS_SERVICE_PROPERTY_BUFFER_MB=0):")
        no_props = cvops(
            {**args.cvops_env, "CVOPS_SERVICE_PROPERTY_BUFFER_MB": "0"},
            name="cvops_no_properties",
            variant=True,
        )
        no_props.label += ", image properties off"
        pg.stop()
        print("compute floor, after the services ...")
        floor = mean_floor(floor_before, probe.measure())
        setup_notes.append(f"at the end {os.getloadavg()[0]:.2f} (1-minute averages)")
        seconds = time.monotonic() - began
        text = report(args, pkg, image, runs, floor, setup_notes, pg.version, seconds, no_props)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print()
    print(text)
    print(f"wrote {args.output} ({seconds:.0f} s)")
    # the exit status is cvops' (errors, rows); the reference's errors are its own findings,
    # in the table and the log findings (its worker drops a connection now and then at c=8)
    reference, ours = runs[:-1], [runs[-1], no_props]
    for run in reference:
        if run.errors or not run.rows_ok:
            print(f"note: {run.label}: {run.errors} errors, rows ok: {run.rows_ok} (not cvops')")
    return 0 if all(run.rows_ok and not run.errors for run in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
