"""Data validation at scale: time and peak memory of the report on a 20k-image dataset.

Generates (once, cached) the 10-class demo dataset with 1600 train + 400 test images per class,
plants a few problems (leaked copies, near copies, corrupt files, odd modes) so that every
report section is exercised, then runs validate_dataset + write_html_report in a fresh process
and prints wall time, throughput and peak RSS (main process and worker processes).

    .venv/bin/python benchmarks/validation.py [--dir /tmp/cvops-bench-validation] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageEnhance

from cvops.data.demo import CLASSES, generate_demo_dataset

N_TRAIN, N_TEST = 1600, 400
PLANTED_LEAKS = 20  # 10 exact + 10 near copies of train images in test


def _generate_class(args: tuple[Path, str]) -> str:
    out, name = args
    generate_demo_dataset(
        out,
        n_train_per_class=N_TRAIN,
        n_test_per_class=N_TEST,
        classes=[name],
        annotations_name=f"annotations_{name}.csv",
    )
    return name


def ensure_dataset(out: Path, workers: int) -> Path:
    marker = out / ".complete"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        for name in pool.map(_generate_class, [(out, c) for c in CLASSES]):
            print(f"  generated {name}")
    plant(out)
    marker.write_text("ok\n")
    print(f"dataset generated in {time.perf_counter() - start:.0f} s")
    return out


def plant(out: Path) -> None:
    """A handful of known problems, so the report has every section and leaks to find."""
    for k, name in enumerate(CLASSES):
        src = out / "train" / name / f"{name}_train_{k:05d}.jpg"
        shutil.copy(src, out / "test" / name / f"planted_leak_exact_{k}.jpg")
        with Image.open(src) as im:
            near = im.resize((im.width * 3 // 4, im.height * 3 // 4))
            ImageEnhance.Brightness(near).enhance(1.1).save(
                out / "test" / name / f"planted_leak_near_{k}.jpg", quality=75
            )
    circle = out / "train" / "circle"
    data = (circle / "circle_train_00100.jpg").read_bytes()
    (circle / "planted_truncated.jpg").write_bytes(data[: len(data) // 2])
    (circle / "planted_text.png").write_text("not an image\n")
    (circle / "planted_empty.jpg").write_bytes(b"")
    with Image.open(circle / "circle_train_00101.jpg") as im:
        im.convert("CMYK").save(circle / "planted_cmyk.jpg")
    Image.new("RGB", (1, 1)).save(circle / "planted_tiny.png")


def measure(dataset: Path, report: Path, workers: int) -> dict[str, float]:
    from cvops.config import ValidationGateConfig
    from cvops.data.validation import validate_dataset, write_html_report

    start = time.perf_counter()
    result = validate_dataset(dataset, classes=None, gates=ValidationGateConfig(), workers=workers)
    analysed = time.perf_counter() - start
    write_html_report(result, report)
    total = time.perf_counter() - start
    kb = 1024.0  # ru_maxrss is in KiB on Linux
    summary = result.summary
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return {
        "cpu_main_s": round(me.ru_utime + me.ru_stime, 1),
        "cpu_workers_s": round(kids.ru_utime + kids.ru_stime, 1),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "images": summary["n_train"] + summary["n_test"],
        "validate_s": round(analysed, 2),
        "total_s": round(total, 2),
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb, 1),
        "peak_rss_worker_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb, 1
        ),
        "report_kib": round(report.stat().st_size / 1024, 1),
        "leaked_test_images": summary["issues.leakage_exact"] + summary["issues.leakage_near"],
        "within_split_duplicates": summary["issues.exact_duplicate"]
        + summary["issues.near_duplicate"],
        "corrupt": summary["issues.corrupt"],
        "status": summary["status"],
        "gate_failures": ",".join(g.name for g in result.gate_failures),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cvops-bench-validation"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    report = args.report or args.dir.with_name(args.dir.name + "-report.html")
    if args.measure:  # the child: nothing else ran in this process, so peak RSS is ours
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(measure(args.dir, report, args.workers)))
        return
    ensure_dataset(args.dir, args.workers)
    cmd = [sys.executable, __file__, "--measure", "--dir", str(args.dir), "--workers"]
    cmd += [str(args.workers), "--report", str(report)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    print(f"dataset        : {args.dir} ({figures['images']} files, 10 classes)")
    print(f"workers        : {args.workers}")
    print(f"validate       : {figures['validate_s']:.1f} s")
    rate = figures["images"] / figures["total_s"]
    print(f"validate+report: {figures['total_s']:.1f} s ({rate:.0f} images/s)")
    print(
        f"CPU time       : main {figures['cpu_main_s']:.0f} s, workers "
        f"{figures['cpu_workers_s']:.0f} s (1-min load average {figures['load_avg_1m']} "
        f"on {os.cpu_count()} cores: other work shares them)"
    )
    print(
        f"peak RSS       : main {figures['peak_rss_main_mib']:.0f} MiB, "
        f"largest worker {figures['peak_rss_worker_mib']:.0f} MiB"
    )
    print(f"report         : {report} ({figures['report_kib']:.0f} KiB)")
    print(
        f"findings       : {figures['leaked_test_images']} leaked test images "
        f"({PLANTED_LEAKS} planted), {figures['within_split_duplicates']} within-split "
        f"duplicates, {figures['corrupt']} corrupt (3 planted)"
    )
    print(f"status         : {figures['status']} (failed gates: {figures['gate_failures']})")


if __name__ == "__main__":
    main()
