"""`make demo-stack`, after `cvops up` and the full flow: normal then shifted traffic through
the stack's nginx, one monitor run after each on the stack's Prefect worker, and where to look.

Usage: python scripts/demo_stack.py [--dataset datasets/demo-shapes] [--scenario brightness]
       [--severity high] [--n 300]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import httpx

from cvops.runtime import bootstrap_env


def sample(folder: Path, n: int, seed: int = 0) -> list[Path]:
    images = sorted(folder.rglob("*.jpg"))
    return random.Random(seed).sample(images, min(n, len(images)))


def send(images: list[Path], service_url: str) -> int:
    ok = 0
    with httpx.Client(timeout=60) as client:
        for image in images:
            reply = client.post(
                f"{service_url}/predict", files={"file": (image.name, image.read_bytes())}
            )
            ok += reply.status_code == 200
    return ok


def monitor_run(n: int) -> str:
    """Run the scheduled deployment now on the stack's worker; returns the drift verdict."""
    from prefect.deployments import run_deployment
    from sqlalchemy import text

    from cvops.monitor.stats import DEFAULT_METHODS
    from cvops.records.schema import make_engine

    run = run_deployment(
        "drift_detection_evidently/drift_detection_evidently",
        parameters={"last_n": n},
        timeout=600,
    )
    if run.state is None or not run.state.is_completed():
        sys.exit(f"monitor run did not complete: {run.state}")
    engine = make_engine(os.environ["CVOPS_SERVICE_DB_URL"])
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT embedding, method, score, threshold, drifted FROM drift_reports "
                "WHERE run_id = (SELECT run_id FROM drift_reports ORDER BY created_on DESC "
                "LIMIT 1)"
            )
        ).all()
    for row in rows:
        print(
            f"    {row.embedding:>6} {row.method:<10} score {row.score:9.4f}  "
            f"threshold {row.threshold if row.threshold is not None else float('nan'):9.4f}  "
            f"{'DRIFT' if row.drifted else 'ok'}"
        )
    alarm = any(r.drifted and r.method in DEFAULT_METHODS.get(r.embedding, ()) for r in rows)
    return "drift" if alarm else "no drift"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("datasets/demo-shapes"))
    parser.add_argument("--scenario", default="brightness")
    parser.add_argument("--severity", default="high")
    parser.add_argument("--n", type=int, default=300, help="images per traffic batch")
    args = parser.parse_args()

    bootstrap_env()  # takes the running stack's settings (cvops up)
    if "CVOPS_SERVICE_URL" not in os.environ or "PREFECT_API_URL" not in os.environ:
        sys.exit("the local stack is not running: start it with `cvops up`")
    from cvops.data.shift import generate_shift_scenarios

    shift_dir = Path(os.environ["CVOPS_STATE_DIR"]) / "demo-shift"
    if not (shift_dir / args.scenario / args.severity).exists():
        # only the background scenario needs the boxes; the DVC demo repo names them this way
        annotations = args.dataset / "annotation_df.csv"
        generate_shift_scenarios(
            args.dataset / "images" / "test",
            shift_dir,
            scenarios=[args.scenario],
            annotations=annotations if annotations.exists() else None,
        )
    # A random sample across classes: the first N sorted paths would be a few classes only,
    # a label shift the monitor rightly reports.
    normal = sample(shift_dir / "none" / "none", args.n)
    shifted = sample(shift_dir / args.scenario / args.severity, args.n)
    service = os.environ["CVOPS_SERVICE_URL"]

    print(f"1. {send(normal, service)}/{len(normal)} un-shifted images sent to {service}")
    calm = monitor_run(len(normal))
    print(f"   monitor verdict: {calm}")
    print(
        f"2. {send(shifted, service)}/{len(shifted)} images with {args.scenario}/"
        f"{args.severity} sent"
    )
    alarm = monitor_run(len(shifted))
    print(f"   monitor verdict: {alarm}")

    from cvops.stack.settings import StackSettings

    stack = StackSettings()
    host = stack.bind_host
    print("\nWhere to look:")
    print(f"  drift over time (Evidently UI): http://{host}:{stack.evidently_ui_port}")
    print(f"  training and evaluation runs (MLflow): {os.environ['MLFLOW_TRACKING_URI']}")
    print(f"  monitor runs (Prefect): {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    print(
        f"  metrics (Prometheus): http://{host}:{stack.prometheus_port}/graph?g0.expr="
        "cvops_drift_score&g1.expr=rate(cvops_requests_total%5B1m%5D)"
    )
    print(f"  web UI: http://{host}:{stack.webui_port}")
    if (calm, alarm) != ("no drift", "drift"):
        sys.exit(f"unexpected verdicts: {calm!r} then {alarm!r}")


if __name__ == "__main__":
    main()
