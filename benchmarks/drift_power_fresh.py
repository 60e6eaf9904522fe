"""Out-of-sample check of the shipped drift verdict on newly rendered images.

``drift_power.py`` draws its windows of 500 from 600-image shift pools built from the test split:
windows share >= 400 images, so its power figures say mostly whether *that pool* differs from
the reference, and the alarm design was tuned while looking at those pools. This script renders
a new demo set (``--seed``, never used by the dataset), builds the shift scenarios on it
(same seed), embeds it with the same trained model and calls the shipped
``cvops.monitor.check.check_drift`` on windows drawn from pools of ``--per-class`` x 10 images.
It also reports the two alarm tests alone at alpha, and BBSD-KS without the entropy component.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/drift_power_fresh.py \\
        --storage /tmp/fresh/central_storage --work /tmp/drift-fresh
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import cast  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drift_power import ALPHA, MODEL, wilson  # noqa: E402

from cvops.monitor.check import EMBEDDINGS, Window, check_drift  # noqa: E402
from cvops.monitor.stats import DriftTester  # noqa: E402
from cvops.storage import CentralStorage, ModelMetadata, read_metadata  # noqa: E402

log = logging.getLogger("drift_power_fresh")
_META = cast(ModelMetadata, SimpleNamespace(model_name=MODEL, version=None))


def build(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Render, shift and embed once; cached in ``--work``."""
    work = Path(args.work)
    cache = work / f"embeddings_seed{args.seed}_{args.per_class}.npz"
    if cache.exists():
        with np.load(cache) as npz:
            return {k: npz[k] for k in npz.files}
    import keras

    from cvops.data.demo import generate_demo_dataset
    from cvops.data.shift import generate_shift_scenarios
    from cvops.model.drift import build_hidden, embed, features
    from cvops.model.pipeline import make_dataset

    storage = CentralStorage(Path(args.storage))
    meta = read_metadata(storage.resolve(f"models/{args.model}.yaml"))
    size = (meta.input_size.h, meta.input_size.w)
    t0 = time.perf_counter()
    data_dir, scen_dir = work / f"data_seed{args.seed}", work / f"scenarios_seed{args.seed}"
    csv = generate_demo_dataset(
        data_dir, n_train_per_class=0, n_test_per_class=args.per_class, seed=args.seed
    )
    generate_shift_scenarios(data_dir / "test", scen_dir, annotations=csv, seed=args.seed)
    log.info("rendered images and scenarios in %.0f s", time.perf_counter() - t0)
    uae = keras.models.load_model(storage.resolve(meta.uae_model_path), compile=False)
    bbsd = keras.models.load_model(storage.resolve(meta.bbsd_model_path), compile=False)
    model = keras.models.load_model(storage.resolve(meta.model_path), compile=False)
    hidden = build_hidden(model, meta.drift_detection.hidden_layer)
    if hidden is None:
        raise SystemExit("the model has no hidden-feature layer: train it with this cvops")
    ref = pd.read_parquet(storage.resolve(meta.reference_data_path))
    arrays = {f"ref/{e}": np.stack(ref[f"{e}_feats"].to_numpy()) for e in EMBEDDINGS}
    manifest = pd.read_csv(scen_dir / "manifest.csv")
    t0 = time.perf_counter()
    for (scenario, severity), rows in manifest.groupby(["scenario", "severity"]):
        paths = [str(scen_dir / p) for p in rows["path"]]
        ds = make_dataset(paths, [0] * len(paths), size, 256, cache=False)
        u, b, _ = embed(uae, bbsd, ds)
        arrays[f"{scenario}/{severity}/uae"], arrays[f"{scenario}/{severity}/bbsd"] = u, b
        arrays[f"{scenario}/{severity}/hidden"] = features(hidden, ds)
    log.info("embedded %d images in %.0f s", len(manifest), time.perf_counter() - t0)
    np.savez_compressed(cache, **arrays)
    return arrays


def rates(data: dict[str, np.ndarray], group: str, n: int, windows: int) -> dict[str, int]:
    """Alarms per rule over ``windows`` windows of ``n`` drawn without replacement."""
    reference = {emb: data[f"ref/{emb}"] for emb in EMBEDDINGS}
    pair_reference = {emb: reference[emb] for emb in ("uae", "bbsd")}
    pair_level = ALPHA / 2
    testers = {
        "uae-mmd at alpha": ("uae", DriftTester(reference["uae"], ("mmd",), ALPHA)),
        "bbsd-ks at alpha": (
            "bbsd",
            DriftTester(reference["bbsd"], ("ks",), ALPHA, ks_entropy=True),
        ),
        f"bbsd-ks-components at {pair_level:g}": (
            "bbsd",
            DriftTester(reference["bbsd"], ("ks",), pair_level),
        ),
        "hidden-classifier at alpha": (
            "hidden",
            DriftTester(reference["hidden"], ("classifier",), ALPHA),
        ),
    }
    pools = {emb: data[f"{group}/{emb}"] for emb in EMBEDDINGS}
    rng = np.random.default_rng([zlib.crc32(group.encode()), n])
    hits = dict.fromkeys(["monitor verdict", "pair verdict (no hidden)", *testers], 0)
    for w in range(windows):
        idx = rng.choice(len(pools["uae"]), n, replace=False)
        window = Window(
            pools["uae"][idx], pools["bbsd"][idx], None, None, hidden=pools["hidden"][idx]
        )
        hits["monitor verdict"] += check_drift(
            reference, window, _META, alpha=ALPHA, seed=w
        ).drifted
        pair = check_drift(pair_reference, window, _META, alpha=ALPHA, seed=w)
        hits["pair verdict (no hidden)"] += pair.drifted
        for name, (emb, tester) in testers.items():
            hits[name] += tester.test(pools[emb][idx], seed=w)[0].drifted
    return hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", default="/tmp/fresh/central_storage")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--work", default="/tmp/drift-fresh")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "drift_fresh.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    data = build(args)
    groups = sorted({k.rsplit("/", 1)[0] for k in data if not k.startswith("ref/")})
    jobs = [("none/none", n, w) for n, w in ((10, 1000), (100, 1000), (500, 200))]
    jobs += [(g, 500, args.windows) for g in groups if g != "none/none"]
    t0 = time.perf_counter()
    rows = []
    for group, n, windows in jobs:
        hits = rates(data, group, n, windows)
        rows.append((group, n, windows, hits))
        log.info("%s n=%d: %s", group, n, hits)
    columns = list(rows[0][3])
    pool = len(data[f"{groups[0]}/uae"])
    lines = [
        "# Drift verdict on newly rendered images (out-of-sample check)",
        "",
        f"Generated by `benchmarks/drift_power_fresh.py --seed {args.seed} --per-class "
        f"{args.per_class}`: a new demo set and shift scenarios (seed {args.seed}), pools of "
        f"{pool} images per scenario, embedded with the benchmark's model; windows drawn "
        f"without replacement; {time.perf_counter() - t0:.0f} s of tests. "
        "`monitor verdict` = `check_drift` as shipped (alpha 0.05 over UAE-MMD, BBSD-KS and "
        "the hidden-feature domain classifier); `pair verdict (no hidden)` = the same for a "
        "package without hidden features (UAE-MMD and BBSD-KS at alpha / 2). "
        "Cells: rate [95% Wilson interval] (alarms).",
        "",
        "| pool | n | windows | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for group, n, windows, hits in rows:
        cells = []
        for name in columns:
            k = hits[name]
            lo, hi = wilson(k, windows)
            cells.append(f"{k / windows:.3f} [{lo:.3f}, {hi:.3f}] ({k})")
        lines.append(f"| {group} | {n} | {windows} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
