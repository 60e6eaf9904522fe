"""What does CVOPS_SERVICE_STORE_IMAGES=central_storage cost the spool flusher?

Spools `--records` prediction records as `/predict` makes them (a 160x120 JPEG upload, PNG
heatmaps, features), then times one flusher pass (`Recorder._flush_spool`, the code the
service's flusher thread runs) into a SQLite prediction DB, with the images kept in the rows
(`db`) or moved to a local central storage (`central_storage`: two files per record). Off the
request path, but it bounds how many predictions per second a worker can record before its
spool grows.

    nice -n 10 .venv/bin/python benchmarks/flush_images.py --work /tmp/flush-images
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from cvops.service.recording import Recorder
from cvops.storage import CentralStorage


def encoded(fmt: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def record(upload: bytes, heatmap: bytes) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "model_name": "bench",
        "model_version": "1",
        "input_img": base64.b64encode(upload).decode("ascii"),
        "raw_hm_img": base64.b64encode(heatmap).decode("ascii"),
        "overlaid_img": base64.b64encode(heatmap).decode("ascii"),
        "prediction_json": {"predicted_class": "a"},
        "uae_feats": [0.0] * 32,
        "bbsd_feats": [0.1] * 10,
        "created_on": "2026-12-03T10:00:00+00:00",
    }


def flush_rate(work: Path, mode: str, records: int, fsync: bool, seed: int) -> float:
    rng = np.random.default_rng(seed)
    upload, heatmap = encoded("JPEG", rng), encoded("PNG", rng)
    folder = work / mode
    shutil.rmtree(folder, ignore_errors=True)
    storage = CentralStorage(folder / "central_storage") if mode == "central_storage" else None
    recorder = Recorder(
        f"sqlite:///{folder / 'db.sqlite'}", folder / "spool", fsync=fsync, image_storage=storage
    )
    recorder._flush_spool(recorder.spool)  # the schema, outside the timing
    recorder.spool.put_groups([[("prediction", record(upload, heatmap))] for _ in range(records)])
    started = time.perf_counter()
    recorder._flush_spool(recorder.spool)
    seconds = time.perf_counter() - started
    recorder.start()
    recorder.stop()
    return records / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/flush-images")
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    for mode in ("db", "central_storage"):
        rates = [
            flush_rate(work, mode, args.records, not args.no_fsync, seed)
            for seed in range(args.repeats)
        ]
        sys.stdout.write(
            f"{mode}: {args.records} records per pass, fsync {not args.no_fsync}: "
            f"{', '.join(f'{r:.0f}' for r in rates)} records/s\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
