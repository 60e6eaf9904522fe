"""The probe behind the monitor's third embedding: which classifier layer (``--layer``; -2 the
penultimate dense layer, -4 the pooled conv features, now shipped as ``hidden``) closes the
out-of-sample power gap of the softmax pair (blur/medium 0.90, noise/medium 0.76 at n = 500)?
Works on models trained before the pooled layer was named (it indexes layers).

Uses the images ``drift_power_fresh.py`` rendered (``--work``, ``--seed``) and the same model.
Reference: the penultimate-layer features of the training images that are not in the
validation split (what ``build_detectors`` would store). Candidate verdict: the shipped pair
plus the hidden-layer domain classifier, each at alpha / 3; also each hidden-layer test alone
at alpha / 3.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/hidden_layer_probe.py
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drift_power import ALPHA, MODEL, _val_and_test, wilson  # noqa: E402

from cvops.monitor.stats import DriftTester  # noqa: E402
from cvops.storage import CentralStorage, read_metadata  # noqa: E402

log = logging.getLogger("hidden_layer_probe")
GROUPS = (
    "none/none",
    "blur/medium",
    "gaussian_noise/medium",
    "background/medium",
    "brightness/medium",
    "contrast/medium",
    "class_prior/medium",
    "unseen_class/medium",
)


def features(args: argparse.Namespace) -> dict[str, np.ndarray]:
    work = Path(args.work)
    cache = work / f"hidden_seed{args.seed}_layer{args.layer}.npz"
    if cache.exists():
        with np.load(cache) as npz:
            return {k: npz[k] for k in npz.files}
    import keras

    from cvops.model.drift import embed
    from cvops.model.pipeline import make_dataset

    storage = CentralStorage(Path(args.storage))
    meta = read_metadata(storage.resolve(f"models/{args.model}.yaml"))
    size = (meta.input_size.h, meta.input_size.w)
    model = keras.models.load_model(storage.resolve(meta.model_path), compile=False)
    hidden = keras.Model(model.inputs, model.layers[args.layer].output, name="hidden")
    ref_u = np.stack(pd.read_parquet(storage.resolve(meta.reference_data_path))["uae_feats"])

    def run(paths: list[str]) -> np.ndarray:
        ds = make_dataset(paths, [0] * len(paths), size, 256, cache=False)
        return embed(hidden, hidden, ds)[0]

    train, val, _ = _val_and_test(Path(args.dataset), meta.classes, 42, 0.1)
    train = train[~train["path"].isin(val["path"])]
    out = {"ref/hidden": run(train["path"].tolist())}
    if len(out["ref/hidden"]) != len(ref_u):
        log.warning("reference rows %d vs stored %d", len(out["ref/hidden"]), len(ref_u))
    scen_dir = work / f"scenarios_seed{args.seed}"
    manifest = pd.read_csv(scen_dir / "manifest.csv")
    for group in GROUPS:
        scenario, severity = group.split("/")
        rows = manifest[(manifest["scenario"] == scenario) & (manifest["severity"] == severity)]
        out[f"{group}/hidden"] = run([str(scen_dir / p) for p in rows["path"]])
    np.savez_compressed(cache, **out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", default="/tmp/fresh/central_storage")
    ap.add_argument("--dataset", default="/tmp/fresh/datasets/demo-shapes")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--work", default="/tmp/drift-fresh")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument("--layer", type=int, default=-2, help="classifier layer (-2: penultimate)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    hidden = features(args)
    with np.load(Path(args.work) / f"embeddings_seed{args.seed}_{args.per_class}.npz") as npz:
        shipped = {k: npz[k] for k in npz.files}
    level = ALPHA / 3
    testers = {
        "uae-mmd": DriftTester(shipped["ref/uae"], ("mmd",), level),
        "bbsd-ks": DriftTester(shipped["ref/bbsd"], ("ks",), level, ks_entropy=True),
        "hidden": DriftTester(
            hidden["ref/hidden"], ("mmd", "ks", "classifier"), level, n_permutations=120
        ),
    }
    jobs = [("none/none", n, w) for n, w in ((10, 500), (100, 500), (500, 200))]
    jobs += [(g, 500, args.windows) for g in GROUPS if g != "none/none"]
    lines = [
        f"| pool | n | windows | pair + hidden-classifier at {level:.4f} | hidden-mmd | "
        "hidden-ks | hidden-classifier |",
        "|---|---|---|---|---|---|---|",
    ]
    t0 = time.perf_counter()
    for group, n, windows in jobs:
        rng = np.random.default_rng([zlib.crc32(group.encode()), n])
        hits = dict.fromkeys(["verdict", "mmd", "ks", "classifier"], 0)
        pool = len(hidden[f"{group}/hidden"])
        for w in range(windows):
            idx = rng.choice(pool, n, replace=False)
            results = {
                r.method: r.drifted
                for r in testers["hidden"].test(hidden[f"{group}/hidden"][idx], seed=w)
            }
            pair = testers["uae-mmd"].test(shipped[f"{group}/uae"][idx], seed=w)[0].drifted
            pair = pair or testers["bbsd-ks"].test(shipped[f"{group}/bbsd"][idx], seed=w)[0].drifted
            hits["verdict"] += pair or results["classifier"]
            for method in ("mmd", "ks", "classifier"):
                hits[method] += results[method]
        cells = []
        for key in ("verdict", "mmd", "ks", "classifier"):
            lo, hi = wilson(hits[key], windows)
            cells.append(f"{hits[key] / windows:.3f} [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| {group} | {n} | {windows} | " + " | ".join(cells) + " |")
        log.info(lines[-1])
    sys.stdout.write("\n".join(lines) + f"\n\n{time.perf_counter() - t0:.0f} s of tests\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
