"""Where a `cvops serve` worker's CPU goes under load: CPU milliseconds per request for every
thread of the workers (named: the service's Python threads get their names as OS thread names
through a sitecustomize on the workers' PYTHONPATH), Postgres and the load generator, at one
concurrency; optionally py-spy profiles (GIL holders only), one file per worker pid.

Reuses `benchmarks/serve.py`'s package, Postgres, service and load generator, so its figures
compare with `make bench-serve`. Absolute numbers depend on what else runs on the machine: run
it on a quiet machine, and compare configurations within one run.

    python benchmarks/serve_threads.py --concurrency 32 --requests 800
    python benchmarks/serve_threads.py --env CVOPS_SERVICE_SPOOL_FSYNC=false --py-spy out.txt
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
import serve as bench  # noqa: E402  (the serving benchmark's parts)

NAME_THREADS = """\
import threading
_run = threading.Thread.run
def _named_run(self):
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(self.name[:15])
    except OSError:
        pass
    return _run(self)
threading.Thread.run = _named_run
"""


def thread_cpu(pids: list[int]) -> dict[tuple[int, str], float]:
    """CPU seconds per (pid, thread name) from /proc (threads of one name summed)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: collections.Counter[tuple[int, str]] = collections.Counter()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[(pid, name)] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(out)


def process_cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def stage_sums(base: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of every `cvops_stage_seconds` stage and of the request
    latency, and (images, model calls) of the batch sizes, from /metrics (all workers: the
    service's metrics are multiprocess)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        if family.name not in ("cvops_stage_seconds", "cvops_request_seconds", "cvops_batch_size"):
            continue
        for sample in family.samples:
            if sample.labels.get("route", "/predict") != "/predict":
                continue
            key = sample.labels.get("stage", "request")
            if family.name == "cvops_batch_size":
                key = "batch images"  # sum: images, count: model calls
            if sample.name.endswith("_sum"):
                out[key][0] += sample.value
            elif sample.name.endswith("_count"):
                out[key][1] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def postgres_processes() -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "postgres" in " ".join(p.info["cmdline"] or [])
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-heatmaps", action="store_true", help="POST /predict?heatmaps=false")
    parser.add_argument(
        "--py-spy", type=Path, help="write raw py-spy profiles, one per worker: PATH.<pid>"
    )
    parser.add_argument("--work", type=Path, help="keep the package here between runs")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    work, storage, package = bench.cached_package(args.work, "cvops-serve-threads-")
    image = bench.demo_image()
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "site").mkdir(parents=True)
    (run_dir / "cwd").mkdir()
    (run_dir / "site" / "sitecustomize.py").write_text(NAME_THREADS)
    pg = bench.Postgres(run_dir / "postgres")
    pg.start()
    port = bench.free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVOPS_")}
    env.update(
        PYTHONPATH=str(run_dir / "site"),
        CENTRAL_STORAGE_PATH=str(storage),
        CVOPS_STATE_DIR=str(run_dir / "state"),
        CVOPS_SERVICE_ADMIN_TOKEN="benchmark",
        CVOPS_SERVICE_DB_URL=pg.create_database("cvops"),
    )
    env.update(dict(item.split("=", 1) for item in args.env))
    cmd = [sys.executable, "-m", "cvops.cli", "serve", "--workers", str(args.workers)]
    cmd += ["--port", str(port), "--model", package.metadata_file]
    service = bench.Service("cvops", cmd, run_dir / "cwd", env, run_dir / "service.log")
    params = {"heatmaps": "false"} if args.no_heatmaps else None
    conc = args.concurrency
    service.start()
    try:
        service.wait_answering(f"{base}/ready")
        time.sleep(3)  # every worker loaded
        assert service.proc is not None
        master = psutil.Process(service.proc.pid)
        workers = master.children(recursive=True)
        url = f"{base}/predict"
        asyncio.run(bench.run_levels(url, image, {conc: 64}, {conc: 8}, None, params))
        groups = {
            "workers": workers,
            "postgres": postgres_processes(),
            "client": [psutil.Process()],
        }
        before = {name: process_cpu(procs) for name, procs in groups.items()}
        stages_before = stage_sums(base)
        threads_before = thread_cpu([w.pid for w in workers])
        spies = []
        for worker in workers if args.py_spy else []:
            # 100 Hz, not pausing the worker: at 250 Hz py-spy's own CPU halved the throughput
            spy_cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--gil"]
            spy_cmd += ["--nonblocking", "-r", "100"]
            out = f"{args.py_spy}.{worker.pid}"
            spy_cmd += ["-f", "raw", "-o", out, "-p", str(worker.pid)]
            spies.append(
                subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        if spies:
            time.sleep(1)
        started = time.perf_counter()
        level = asyncio.run(
            bench.run_levels(url, image, {conc: args.requests}, {conc: 0}, None, params)
        )[conc]
        wall = time.perf_counter() - started
        for spy in spies:
            spy.send_signal(2)
            spy.wait(60)
        stages_after = stage_sums(base)
        groups["postgres"] = postgres_processes()
        threads_after = thread_cpu([w.pid for w in workers])
        n = args.requests
        print(
            f"c={conc}, {n} requests: {level.rps:.1f} req/s, p50 {level.p50:.1f} ms, "
            f"p99 {level.p99:.0f} ms, errors {level.errors}, wall {1000 * wall / n:.2f} ms/request"
        )
        mean = statistics.mean(level.latencies_ms) if level.latencies_ms else float("nan")
        print(f"mean latency at the client {mean:.2f} ms; in the service, mean ms per request:")
        for stage, (total, count) in stages_after.items():
            done = count - stages_before.get(stage, (0.0, 0.0))[1]
            spent = total - stages_before.get(stage, (0.0, 0.0))[0]
            if done and stage == "batch images":
                print(f"  images per model call: {spent / done:.2f} ({done:.0f} calls)")
            elif done:
                print(f"  {stage:>12}: {1000 * spent / done:6.2f} ({done:.0f} observed)")
        print("CPU ms per request:")
        for name, procs in groups.items():
            print(f"  {name:>10}: {1000 * (process_cpu(procs) - before[name]) / n:6.2f}")
        spent = {k: v - threads_before.get(k, 0.0) for k, v in threads_after.items()}
        for (pid, name), seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            if seconds > 0:
                print(f"  worker {pid} thread {name:>15}: {1000 * seconds / n:6.2f}")
    finally:
        service.stop()
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
