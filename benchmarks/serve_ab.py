"""Paired A/B of two versions or settings of `cvops serve`: both services run side by side
(idle but for their turn), and every round measures the compute floor, then c=1 of each,
then c=32 of each, alternating which goes first. The ratios B/A of a round compare
measurements seconds apart, so the machine's drift (often larger than the change measured)
cancels; the medians of the paired ratios are the answer.

Reuses `benchmarks/serve.py`'s package, Postgres, service and load generator.

    python benchmarks/serve_ab.py --b-src /tmp/other-checkout/src   # B: another checkout
    python benchmarks/serve_ab.py --b-env CVOPS_SERVICE_PNG_COMPRESSION=0   # B: a setting
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve as bench  # noqa: E402  (the serving benchmark's parts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--c1-requests", type=int, default=200)
    parser.add_argument("--c32-requests", type=int, default=800)
    parser.add_argument("--a-src", type=Path, help="A's `src` folder (default: this checkout)")
    parser.add_argument("--b-src", type=Path, help="B's `src` folder (default: this checkout)")
    parser.add_argument("--a-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--b-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, help="keep the package here between runs")
    return parser.parse_args()


def start_service(
    name: str,
    src: Path | None,
    extra: list[str],
    args: argparse.Namespace,
    pg: bench.Postgres,
    storage: Path,
    package: bench.Package,
    run_dir: Path,
    stack: contextlib.ExitStack,
) -> tuple[bench.Service, str]:
    port = bench.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVOPS_")}
    env.pop("PYTHONPATH", None)
    if src is not None:
        env["PYTHONPATH"] = str(src.resolve())
    env.update(
        CENTRAL_STORAGE_PATH=str(storage),
        CVOPS_STATE_DIR=str(run_dir / f"{name}-state"),
        CVOPS_SERVICE_ADMIN_TOKEN="benchmark",
        CVOPS_SERVICE_DB_URL=pg.create_database(name),
    )
    env.update(dict(item.split("=", 1) for item in extra))
    cmd = [sys.executable, "-m", "cvops.cli", "serve", "--workers", str(args.workers)]
    cmd += ["--port", str(port), "--model", package.metadata_file]
    (run_dir / f"{name}-cwd").mkdir()
    service = bench.Service(name, cmd, run_dir / f"{name}-cwd", env, run_dir / f"{name}.log")
    service.start()
    stack.callback(service.stop)
    base = f"http://127.0.0.1:{port}"
    service.wait_answering(f"{base}/ready")
    serving = "SELECT count(*) FROM replicas WHERE ok AND generation >= 1"
    bench.wait_for(lambda: pg.query(name, serving)[0][0] >= args.workers, 120)
    return service, f"{base}/predict"


def main() -> int:
    args = parse_args()
    work, storage, package = bench.cached_package(args.work, "cvops-serve-ab-")
    image = bench.demo_image()
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    os.chmod(run_dir, 0o755)
    with contextlib.ExitStack() as stack:
        pg = bench.Postgres(run_dir / "postgres")
        stack.callback(pg.stop)
        pg.start()
        urls = {
            "A": start_service(
                "a", args.a_src, args.a_env, args, pg, storage, package, run_dir, stack
            )[1],
            "B": start_service(
                "b", args.b_src, args.b_env, args, pg, storage, package, run_dir, stack
            )[1],
        }
        probe = bench.FloorProbe(storage, package, image)
        counts = {1: args.c1_requests, 32: args.c32_requests}

        def level(url: str, c: int) -> bench.Level:
            warm = bench.CVOPS_WARMUP[c]
            return asyncio.run(bench.run_levels(url, image, {c: counts[c]}, {c: warm}))[c]

        for name, url in urls.items():  # every batch size compiled and warm in both
            print(f"warming {name}:")
            level(url, 1)
            level(url, 32)
        rows = []
        for number in range(1, args.rounds + 1):
            order = ["A", "B"] if number % 2 else ["B", "A"]
            floor = probe.measure(with_properties=False)
            print(f"round {number}: floor {floor.ms_one_image:.2f} ms, order {''.join(order)}")
            got = {(n, c): level(urls[n], c) for c in (1, 32) for n in order}
            errors = sum(lv.errors for lv in got.values())
            rows.append(
                (
                    floor.ms_one_image,
                    got["A", 1].p50,
                    got["B", 1].p50,
                    got["A", 32].rps,
                    got["B", 32].rps,
                    errors,
                )
            )
            time.sleep(0.5)
    print()
    print(
        "| round | floor ms | A c=1 p50 | B c=1 p50 | B/A | A c=32 req/s | B c=32 | B/A | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (fl, a1, b1, a32, b32, err) in enumerate(rows, 1):
        print(
            f"| {i} | {fl:.2f} | {a1:.2f} | {b1:.2f} | {b1 / a1:.3f} | {a32:.1f} | {b32:.1f} | "
            f"{b32 / a32:.3f} | {err} |"
        )
    med = statistics.median
    a1, b1 = med(r[1] for r in rows), med(r[2] for r in rows)
    print(
        f"median paired B/A: c=1 p50 {med(r[2] / r[1] for r in rows):.3f} (A {a1:.2f} ms, "
        f"B {b1:.2f} ms; A/floor {med(r[1] / r[0] for r in rows):.2f}x, B/floor "
        f"{med(r[2] / r[0] for r in rows):.2f}x), c=32 req/s {med(r[4] / r[3] for r in rows):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
