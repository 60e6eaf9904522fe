"""Drift detection power and false-alarm rate of the monitor's tests vs the reference's settings.

For each shift scenario x severity x window size x method: the detection rate over ``--windows``
windows; on un-shifted held-out images: the false-alarm rate over ``--null-windows`` windows with
a 95% Wilson interval. Anchor: Rabanser et al., "Failing Loudly" (NeurIPS 2019).

Data (built once under ``--work``, then cached):
- reference: ``ref_data/<model>_ref_data.parquet`` (UAE/BBSD/hidden features of the training
  images);
- un-shifted held-out pool: the validation split (train images held out from training), the test
  split, and extra images rendered by the demo generator from test-split seeds the dataset does
  not use (same distribution, never seen by the model); windows are drawn without replacement;
- shifted pools: ``cvops.data.shift.generate_shift_scenarios`` on the test split (600 images
  each, plus the unshifted copy ``none/none`` as a control). Every window is drawn without
  replacement from its pool when it fits (n <= 600), so windows of 500 overlap heavily; n = 1000
  needs replacement, whose duplicates inflate every test's rejection rate (resampling noise on
  top of the pool's own deviation): read n = 1000 against the ``none/none`` control row. (A
  first run drew n = 500 with replacement too: ``none/none`` then "drifted" in up to 82% of
  windows, so those rates measured the resampling, not the shift.)
Embeddings are computed once per image (``embeddings.npz``); windows are index draws.

Methods: ours (``cvops.monitor.stats.DriftTester``, permutation/Bonferroni-calibrated, each at
alpha = 0.05) and the reference's Evidently legacy settings, replicated in numpy from the
Evidently 0.7.23 legacy source (``evidently/legacy/metrics/data_drift/embedding_drift_methods.py``;
running the real ``EmbeddingsDriftMetric`` per window costs seconds for its t-SNE plot alone).
``--verify K`` runs the real Evidently drift methods on K windows per size and reports agreement.

Monitor verdict: what the monitor ships, measured by calling ``cvops.monitor.check.check_drift``
itself on every window (alarm tests ``DEFAULT_METHODS`` = UAE-MMD + BBSD-KS + the domain
classifier on the hidden features, each at alpha / 3, with check_drift's own permutation
counts; ``seed`` = the window number, as for the per-method rows). Its verdict, "any alarm
test fires", is the row the issue's target is about.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/drift_power.py \\
        --storage /tmp/fresh/central_storage --dataset /tmp/fresh/datasets/demo-shapes
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per worker: far faster on shared cores

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import cast  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from cvops.monitor.check import Window, alpha_levels, check_drift  # noqa: E402
from cvops.monitor.stats import (  # noqa: E402
    DEFAULT_METHODS,
    DriftTester,
    ks_critical,
    ks_statistics,
)
from cvops.storage import ModelMetadata  # noqa: E402

log = logging.getLogger("drift_power")

MODEL = "demo_shapes_classifier_50px"
SIZES = (10, 100, 500, 1000)
ALPHA = 0.05  # the monitor's default false-alarm rate per run (MonitorConfig.alpha)
MONITOR = "monitor-verdict"  # rows holding check_drift's verdict (score: smallest alarm p)
MONITOR_LABEL = "monitor verdict"
# check_drift reads only the name and version from the metadata
_META = cast(ModelMetadata, SimpleNamespace(model_name=MODEL, version=None))
OURS = {
    "uae": ("mmd", "ks", "distance", "classifier"),
    "bbsd": ("mmd", "ks"),
    "hidden": ("mmd", "ks", "classifier"),
}
EMBEDDINGS = tuple(OURS)
# BBSD-KS as shipped tests the softmax components plus their entropy; "ks-components" is the
# same test on the components only (as in "Failing Loudly"), to show what the entropy adds.
COMPONENTS_ONLY = "ks-components"
# The reference's settings (its monitor flow): mmd(threshold=0.015, quantile_probability=0.95)
# (no bootstrap, so a fixed threshold), ratio(component_stattest="ks", threshold=0.05) (per-
# component cut stays at the default 0.1), distance("euclidean", threshold=0.2), model(0.75).
# "evd-" rows: Evidently's own defaults where they differ (ratio: wasserstein; model: 0.55).
BASELINES = {
    "uae": ("ref-mmd", "ref-ratio-ks", "ref-distance", "ref-model", "evd-ratio-wass", "evd-model"),
    "bbsd": ("ref-mmd", "ref-ratio-ks", "evd-ratio-wass"),
}
NOTES = [
    "## Notes",
    "",
    "- Shipped rule (`check_drift`: UAE-MMD or BBSD-KS or the domain classifier on the "
    "hidden features, Bonferroni at alpha / 3 each; BBSD-KS tests the 10 softmax components "
    "plus the predictive entropy): false alarms 5.2% / 3.5% / 2.0% / 0.5% at n = 10 / 100 / "
    "500 / 1000 (95% intervals [4.0, 6.8], [2.5, 4.8], [0.8, 5.0], [0.1, 2.8]). Each test "
    "is a valid level-alpha/3 test (permutation or conservative KS), so the union bound "
    "keeps the expected rate <= 5%; 52 of 1000 at n = 10 is within sampling noise of it "
    "(P[Bin(1000, 0.05) >= 52] ~ 0.4), and on newly rendered images (`drift_fresh.md`) the "
    "same rule false-alarms 3.7% / 3.8% / 0.0% at n = 10 / 100 / 500. The three tests each "
    "at alpha (not shipped) would false-alarm 12.3% at n = 10.",
    "- Power at n = 500: every medium+ shift 1.00, and also background/low 1.00, blur/low "
    "0.96, brightness/low and contrast/low 1.00. Out of sample (`drift_fresh.md`, pools of "
    "2000 new images): every medium+ shift 50/50; the pair without the hidden features got "
    "blur/medium 45/50 and gaussian_noise/medium 38/50 there.",
    "- Why the hidden features: blur and noise barely move the softmax (the model's accuracy "
    "does not change) but move the pooled conv features a lot; a domain classifier on them "
    "(hidden-classifier) catches both. The layer was chosen with "
    "`benchmarks/hidden_layer_probe.py` on the fresh images (penultimate dense layer: "
    "blur/medium 0.94; pooled conv features: 1.00). The per-method rows show what each "
    "embedding sees: UAE misses blur and noise (random conv features average the noise "
    "out), BBSD-KS carries label shift and unseen classes, hidden-classifier the rest.",
    "- BBSD-KS's entropy component: blur/low 0.08 -> 0.68 and unseen_class/low 0.16 -> 0.74 "
    "at n = 500 against `bbsd-ks-components` (each at alpha), at no false-alarm cost.",
    "- Windows of 500 from a 600-image pool share >= 400 images, so the 50 windows here are "
    "far from independent and the intervals optimistic: `drift_fresh.md` is the out-of-sample "
    "check.",
    "- The reference is the training images' features (as in the reference project); the "
    "model is more confident on them than on new images (a KS on the entropy alone at 5% "
    "flagged 8% of un-shifted windows of 500 in a side check), and hidden-classifier "
    "false-alarms 4.7% / 0.9% / 0% / 0% at alpha, so the bias stays small here.",
    "- `check_drift` is called with seed = window number, which also moves its MMD reference "
    "subsample (1000 of 2250 rows); the per-method testers keep seed 0 for it.",
    "- Model: the demo config retrained with this code (test accuracy 0.8767, as before: the "
    "rows of the earlier tests reproduce the previous run). Data preparation 255 s under load.",
    "- Low severities: gaussian_noise/low (sigma 0.03) and unseen_class/low (10% unseen "
    "shapes) stay below what 500 samples reveal (0.18 and 0.42).",
    "- Baselines: the reference's KS-ratio flags 30-60% of un-shifted windows (component cut "
    "0.1, 2 of 32 components suffice); Evidently's default Wasserstein ratio flags ~100% at "
    "n <= 100; its fixed MMD threshold 0.015 flags ~22% at n=10 and nothing later; fixed "
    "distance 0.2 and AUC 0.75 never false-alarm but also miss blur, noise and unseen classes.",
    "- n=1000 draws from 600-image shift pools need replacement: compare with `none/none`.",
    "",
]
EXTRA_PER_CLASS = 200  # extra un-shifted held-out images per class from unused test seeds


# ----------------------------------------------------------------------------- data preparation


def _val_and_test(dataset: Path, classes: list[str], seed: int, val_fraction: float):
    from cvops.data.images import index_split, select_classes, stratified_split

    train = select_classes(index_split(dataset, "train"), classes)
    _, val = stratified_split(train, val_fraction, seed)  # as cvops.model.train.load_splits
    test = select_classes(index_split(dataset, "test"), classes)
    return train, val, test


def prepare(args: argparse.Namespace) -> Path:
    """Scenarios, extra held-out images and the embeddings cache; returns the .npz path."""
    work = Path(args.work)
    cache = work / f"embeddings_{args.model}.npz"
    if cache.exists():
        log.info("embeddings cache %s", cache)
        return cache
    import keras

    from cvops.data.demo import generate_demo_dataset
    from cvops.data.shift import generate_shift_scenarios
    from cvops.model.drift import build_hidden, embed, features
    from cvops.model.pipeline import make_dataset
    from cvops.storage import CentralStorage, read_metadata

    storage = CentralStorage(Path(args.storage))
    meta = read_metadata(storage.resolve(f"models/{args.model}.yaml"))
    classes, size = meta.classes, (meta.input_size.h, meta.input_size.w)
    dataset = Path(args.dataset)
    scen_dir = work / "scenarios"
    if not (scen_dir / "manifest.csv").exists():
        t0 = time.perf_counter()
        generate_shift_scenarios(
            dataset / "images" / "test", scen_dir, annotations=dataset / "annotation_df.csv"
        )
        log.info("shift scenarios in %.0f s", time.perf_counter() - t0)
    extra_dir = work / "heldout"
    n_test = len(list((dataset / "images" / "test" / classes[0]).glob("*.jpg")))
    if not (extra_dir / "annotations.csv").exists():
        t0 = time.perf_counter()
        generate_demo_dataset(
            extra_dir, n_train_per_class=0, n_test_per_class=n_test + EXTRA_PER_CLASS, seed=0
        )
        log.info("extra held-out images in %.0f s", time.perf_counter() - t0)

    train, val, test = _val_and_test(dataset, classes, args.split_seed, args.val_fraction)
    extra = [
        (str(p), classes.index(c))
        for c in classes
        for p in sorted((extra_dir / "test" / c).glob("*.jpg"))
        if int(p.stem.rsplit("_", 1)[1]) >= n_test  # only images the dataset does not hold
    ]
    index = {c: i for i, c in enumerate(classes)}
    groups: dict[str, tuple[list[str], list[int]]] = {
        "heldout_val": (val["path"].tolist(), val["target"].tolist()),
        "heldout_test": (test["path"].tolist(), test["target"].tolist()),
        "heldout_extra": ([p for p, _ in extra], [t for _, t in extra]),
    }
    manifest = pd.read_csv(scen_dir / "manifest.csv")
    for (scen, sev), rows in manifest.groupby(["scenario", "severity"]):
        paths = [str(scen_dir / p) for p in rows["path"]]
        targets = [index.get(Path(p).parent.name, -1) for p in rows["path"]]
        groups[f"{scen}/{sev}"] = (paths, targets)
    uae = keras.models.load_model(storage.resolve(meta.uae_model_path), compile=False)
    bbsd = keras.models.load_model(storage.resolve(meta.bbsd_model_path), compile=False)
    model = keras.models.load_model(storage.resolve(meta.model_path), compile=False)
    hidden = build_hidden(model, meta.drift_detection.hidden_layer)
    if hidden is None:
        raise SystemExit("the model has no hidden-feature layer: train it with this cvops")
    ref = pd.read_parquet(storage.resolve(meta.reference_data_path))
    arrays = {
        "ref/uae": np.stack(ref["uae_feats"].to_numpy()),
        "ref/bbsd": np.stack(ref["bbsd_feats"].to_numpy()),
        "ref/hidden": np.stack(ref["hidden_feats"].to_numpy()),
        "ref/target": ref["label"].map(index).to_numpy(),
    }
    t0 = time.perf_counter()
    n_images = 0
    # sanity: recomputed features of the first training images equal the stored reference
    groups["check_train"] = (train["path"].tolist(), train["target"].tolist())
    for key, (paths, targets) in groups.items():
        if key == "check_train":
            keep = set(Path(p).name for p in paths) - set(Path(p).name for p in val["path"])
            paths = [p for p in paths if Path(p).name in keep][:64]
            targets = [0] * len(paths)
        ds = make_dataset(paths, [max(t, 0) for t in targets], size, 256, cache=False)
        u, b, _ = embed(uae, bbsd, ds)
        arrays[f"{key}/uae"], arrays[f"{key}/bbsd"] = u, b
        arrays[f"{key}/hidden"] = features(hidden, ds)
        arrays[f"{key}/target"] = np.asarray(targets)
        n_images += len(paths)
    diff = max(
        np.abs(arrays[f"check_train/{e}"] - arrays[f"ref/{e}"][:64]).max() for e in EMBEDDINGS
    )
    log.info("embedded %d images in %.0f s", n_images, time.perf_counter() - t0)
    log.info("reference check: max |recomputed - stored| feature = %.2e", diff)
    np.savez_compressed(cache, **arrays)
    return cache


# ----------------------------------------------------------------------------- baselines (numpy)


def _evidently_mmd(ref: np.ndarray, cur: np.ndarray, d_rr_upper: np.ndarray) -> float:
    """MMDDriftMethod without bootstrap: sigma² = median of ref-cur distances on pandas
    ``sample(min(., 1000), random_state=0)`` subsets, gamma = 1/sigma², unbiased MMD² over the
    full reference; score = max(MMD², 0) (drift compares the raw MMD² to the threshold)."""
    m, n = len(ref), len(cur)
    xs = ref[_pandas_sample_index(m, min(m, 1000))]
    ys = cur[_pandas_sample_index(n, min(n, 1000))]
    sigma2 = np.median(np.sqrt(_sq(xs, ys))) ** 2
    gamma = 1.0 / sigma2
    kxx = 2.0 * np.exp(-gamma * d_rr_upper).sum()  # off-diagonal sum (diag excluded below)
    kyy = np.exp(-gamma * _sq(cur, cur))
    kxy = np.exp(-gamma * _sq(ref, cur))
    return (
        kxx / (m * (m - 1.0))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1.0))
        - 2.0 / (m * n) * kxy.sum()
    )


_SAMPLE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _pandas_sample_index(n_rows: int, k: int) -> np.ndarray:
    """Positions pandas ``DataFrame.sample(k, random_state=0)`` picks (cached per size)."""
    key = (n_rows, k)
    if key not in _SAMPLE_CACHE:
        _SAMPLE_CACHE[key] = pd.RangeIndex(n_rows).to_series().sample(k, random_state=0).to_numpy()
    return _SAMPLE_CACHE[key]


def _sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def _evidently_model(ref: np.ndarray, cur: np.ndarray) -> float:
    """ModelDriftMethod: 50/50 train_test_split(random_state=42), SGDClassifier(log_loss,
    random_state=42), ROC AUC on the test half (reference labelled 1)."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    x = np.vstack([ref, cur])
    y = np.r_[np.ones(len(ref)), np.zeros(len(cur))]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=42, shuffle=True)
    if len(np.unique(y_te)) < 2:
        return 0.5
    clf = SGDClassifier(loss="log_loss", random_state=42).fit(x_tr, y_tr)
    return float(roc_auc_score(y_te, clf.predict_proba(x_te)[:, 1]))


class Baselines:
    """The reference's decision rules on one embedding, with reference-side work cached."""

    def __init__(self, ref: np.ndarray, names: tuple[str, ...]) -> None:
        self.ref, self.names = ref, names
        self.ref_sorted = np.sort(ref, axis=0)
        self.ref_mean = ref.mean(0)
        self.ref_std = np.maximum(ref.std(0), 0.001)
        self.d_rr_upper = _sq(ref, ref)[np.triu_indices(len(ref), k=1)].astype(np.float32)

    def decide(self, cur: np.ndarray) -> dict[str, tuple[float, bool]]:
        out: dict[str, tuple[float, bool]] = {}
        for name in self.names:
            if name == "ref-mmd":
                mmd2 = _evidently_mmd(self.ref, cur, self.d_rr_upper)
                out[name] = (max(mmd2, 0.0), mmd2 > 0.015)
            elif name == "ref-ratio-ks":  # ks p <= 0.1 per component; share > 0.05
                d_stat, en = ks_statistics(self.ref_sorted, cur)
                share = float(np.mean(d_stat >= ks_critical(0.1, en)))  # <=> p <= 0.1
                out[name] = (share, share > 0.05)
            elif name == "evd-ratio-wass":  # normed wasserstein >= 0.1 per component; share > 0.2
                wd = np.array(
                    [
                        stats.wasserstein_distance(self.ref[:, j], cur[:, j])
                        for j in range(cur.shape[1])
                    ]
                )
                share = float(np.mean(wd / self.ref_std >= 0.1))
                out[name] = (share, share > 0.2)
            elif name == "ref-distance":
                dist = float(np.linalg.norm(self.ref_mean - cur.mean(0)))
                out[name] = (dist, dist > 0.2)
            elif name in ("ref-model", "evd-model"):
                auc = _evidently_model(self.ref, cur)
                out[name] = (auc, auc > (0.75 if name == "ref-model" else 0.55))
        return out


# ----------------------------------------------------------------------------- windows


def _draw(rng: np.random.Generator, pool: int, n: int, replace: bool) -> np.ndarray:
    return rng.choice(pool, n, replace=replace or n > pool)


def _task(job: tuple[str, int, int, str, int]) -> list[dict[str, object]]:
    """All windows of one (group, n): a worker-process entry point."""
    group, n, n_windows, cache, seed = job
    data = _load(cache)
    testers, baselines = _testers(cache)
    reference = {emb: data[f"ref/{emb}"] for emb in EMBEDDINGS}
    pools = {emb: data[f"{group}/{emb}"] for emb in EMBEDDINGS}
    rng = np.random.default_rng([seed, zlib.crc32(group.encode()), n])
    rows: list[dict[str, object]] = []
    for w in range(n_windows):
        idx = _draw(rng, len(pools["uae"]), n, False)  # replaces only when n > pool
        for emb, pool in pools.items():
            cur = pool[idx]
            for res in testers[emb].test(cur, seed=w):
                rows.append(_row(group, n, w, f"{emb}-{res.method}", res.score, res.drifted))
            if emb == "bbsd":
                (res,) = testers[COMPONENTS_ONLY].test(cur, seed=w)
                rows.append(_row(group, n, w, f"bbsd-{COMPONENTS_ONLY}", res.score, res.drifted))
            if emb in baselines:
                for name, (score, drifted) in baselines[emb].decide(cur).items():
                    rows.append(_row(group, n, w, f"{emb}-{name}", score, drifted))
        # the shipped rule: check_drift itself, its alarm tests at alpha / 3 each
        window = Window(
            pools["uae"][idx], pools["bbsd"][idx], None, None, hidden=pools["hidden"][idx]
        )
        check = check_drift(
            reference,
            window,
            _META,
            methods=DEFAULT_METHODS,
            alarm_methods=DEFAULT_METHODS,
            alpha=ALPHA,
            seed=w,
        )
        alarm_p = [r.p_value for rs in check.results.values() for r in rs]
        rows.append(_row(group, n, w, MONITOR, min(alarm_p), check.drifted))
    return rows


def _row(group: str, n: int, w: int, method: str, score: float, drifted: bool) -> dict:
    return {
        "group": group,
        "n": n,
        "window": w,
        "method": method,
        "score": float(score),
        "drifted": bool(drifted),
    }


_DATA: dict[str, dict[str, np.ndarray]] = {}
_TESTERS: dict[str, tuple[dict[str, DriftTester], dict[str, Baselines]]] = {}


def _load(cache: str) -> dict[str, np.ndarray]:
    if cache not in _DATA:
        with np.load(cache) as npz:
            data = {k: npz[k] for k in npz.files}
        for emb in EMBEDDINGS:
            data[f"heldout/{emb}"] = np.concatenate(
                [data[f"heldout_{part}/{emb}"] for part in ("val", "test", "extra")]
            )
        _DATA[cache] = data
    return _DATA[cache]


def _testers(cache: str) -> tuple[dict[str, DriftTester], dict[str, Baselines]]:
    if cache not in _TESTERS:
        data = _load(cache)
        testers = {
            "uae": DriftTester(data["ref/uae"], OURS["uae"]),
            "bbsd": DriftTester(data["ref/bbsd"], OURS["bbsd"], ks_entropy=True),
            COMPONENTS_ONLY: DriftTester(data["ref/bbsd"], ("ks",)),
            "hidden": DriftTester(data["ref/hidden"], OURS["hidden"]),
        }
        _TESTERS[cache] = (
            testers,
            {emb: Baselines(data[f"ref/{emb}"], BASELINES[emb]) for emb in BASELINES},
        )
    return _TESTERS[cache]


# ----------------------------------------------------------------------------- verification


def verify(cache: str, n_windows: int, sizes: tuple[int, ...]) -> list[str]:
    """Run the real Evidently legacy drift methods on a few windows; compare with the replica."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import (
        distance,
        mmd,
        model,
        ratio,
    )

    real = {
        "ref-mmd": mmd(threshold=0.015, quantile_probability=0.95),
        "ref-ratio-ks": ratio(component_stattest="ks", threshold=0.05),
        "ref-distance": distance(dist="euclidean", threshold=0.2),
        "ref-model": model(threshold=0.75),
        "evd-ratio-wass": ratio(),
        "evd-model": model(),
    }
    data = _load(cache)
    _, baselines = _testers(cache)
    rng = np.random.default_rng(123)
    agree, total, max_diff = {}, {}, {}
    for n in sizes:
        for group in ("heldout", "blur/high", "brightness/medium"):
            for _ in range(n_windows):
                idx = _draw(rng, len(data[f"{group}/uae"]), n, False)
                for emb in ("uae", "bbsd"):
                    ref, cur = data[f"ref/{emb}"], data[f"{group}/{emb}"][idx]
                    cols = [f"c{j}" for j in range(ref.shape[1])]
                    mine = baselines[emb].decide(cur)
                    for name, (score, drifted) in mine.items():
                        r_score, r_drift, _ = real[name](
                            pd.DataFrame(cur, columns=cols), pd.DataFrame(ref, columns=cols)
                        )
                        key = f"{emb}-{name}"
                        agree[key] = agree.get(key, 0) + int(bool(r_drift) == drifted)
                        total[key] = total.get(key, 0) + 1
                        max_diff[key] = max(max_diff.get(key, 0.0), abs(float(r_score) - score))
    return [
        f"| {k} | {agree[k]}/{total[k]} | {max_diff[k]:.2g} |"
        for k in sorted(total, key=_method_order)
    ]


# ----------------------------------------------------------------------------- report


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def _method_order(method: str) -> tuple[int, int]:
    emb, name = method.split("-", 1)
    names = [*OURS[emb], *([COMPONENTS_ONLY] if emb == "bbsd" else []), *BASELINES.get(emb, ())]
    return (EMBEDDINGS.index(emb), names.index(name) if name in names else 99)


def _is_ours(method: str) -> bool:
    emb, name = method.split("-", 1)
    return name in OURS.get(emb, ()) or (emb == "bbsd" and name == COMPONENTS_ONLY)


def _default(method: str) -> bool:
    emb, name = method.split("-", 1)
    return name in DEFAULT_METHODS.get(emb, ())


def report(
    df: pd.DataFrame, sizes: tuple[int, ...], runtime: str, accuracy: dict, verify_rows: list[str]
) -> str:
    if MONITOR not in set(df["method"]):
        raise SystemExit(f"no {MONITOR!r} rows in these windows: re-run without --from-csv")
    methods = sorted((m for m in df["method"].unique() if m != MONITOR), key=_method_order)
    ours = [m for m in methods if _is_ours(m)]
    default = [m for m in methods if _default(m)]
    rates = df.groupby(["group", "n", "method"])["drifted"].agg(["sum", "count"])
    # the shipped verdict: check_drift on each window (alarm pair at alpha / 2 each)
    mon_rates = rates.xs(MONITOR, level="method")
    # for comparison, the same pair each at alpha (what an un-corrected monitor would do)
    anyd = df[df["method"].isin(default)].groupby(["group", "n", "window"])["drifted"].any()
    any_rates = anyd.groupby(["group", "n"]).agg(["sum", "count"])
    levels = alpha_levels(DEFAULT_METHODS, ALPHA)
    shipped_levels = ", ".join(
        f"{e}-{m} at {levels[e]:g}" for e, ms in DEFAULT_METHODS.items() for m in ms
    )
    any_label = f"{' or '.join(default)}, each at alpha (not shipped)"
    lines = [
        "# Drift detection power (UAE / BBSD embeddings)",
        "",
        "Generated by `benchmarks/drift_power.py`; method, data and caveats in its docstring. "
        "Anchor: Rabanser et al., *Failing Loudly* (NeurIPS 2019).",
        "",
        runtime,
        "",
        "Methods: `uae-*` / `bbsd-*` / `hidden-*` = embedding (`hidden`: the classifier's "
        "pooled conv features). Ours (`cvops.monitor.stats`, alpha 0.05, "
        "calibrated per window): `mmd` (permutation MMD², 100 permutations, reference subsample "
        "1000), `ks` (per-component KS, Bonferroni; on BBSD the softmax components plus their "
        "entropy; `bbsd-ks-components`: the components only), `distance` (mean-embedding distance, "
        "permutation threshold), `classifier` (cross-validated domain classifier, permutation "
        "threshold). Baselines (Evidently legacy rules, numpy replica): `ref-*` = the "
        "reference's own settings (`mmd(threshold=0.015)`, `ratio(component_stattest='ks', "
        "threshold=0.05)` i.e. per-component p <= 0.1, `distance(threshold=0.2)`, "
        "`model(threshold=0.75)`); `evd-*` = Evidently defaults where they differ "
        "(`ratio()` = normed Wasserstein >= 0.1 on > 20% of components, `model()` = AUC > 0.55). "
        f"Enabled by default (`DEFAULT_METHODS`): {', '.join(default)}. "
        f"**{MONITOR_LABEL}** = what the monitor ships: `cvops.monitor.check.check_drift` "
        f"called on each window, drift if {' or '.join(default)} fires, at {shipped_levels} "
        f"(Bonferroni), so the run's false-alarm rate is "
        f"<= alpha = {ALPHA:g}. The per-method rows are each at alpha = {ALPHA:g}.",
        "",
        "## False alarms on un-shifted held-out data (rate [95% Wilson interval])",
        "",
        "| method | " + " | ".join(f"n={n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    fa_ok: dict[str, bool] = {}
    fa_consistent: dict[str, bool] = {}
    for m in [MONITOR, *methods, "any default"]:
        cells = []
        for n in sizes:
            if m == "any default":
                k, c = any_rates.loc[("heldout", n)]
            elif m == MONITOR:
                k, c = mon_rates.loc[("heldout", n)]
            else:
                k, c = rates.loc[("heldout", n, m)]
            lo, hi = wilson(int(k), int(c))
            cells.append(f"{k / c:.3f} [{lo:.3f}, {hi:.3f}] ({int(c)})")
            fa_ok[m] = fa_ok.get(m, True) and k / c <= ALPHA
            fa_consistent[m] = fa_consistent.get(m, True) and lo <= ALPHA
        if m == MONITOR:
            label = f"**{MONITOR_LABEL}** (shipped)"
        elif m == "any default":
            label = any_label
        else:
            label = m + (" (default)" if m in default else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    groups = sorted(g for g in df["group"].unique() if g != "heldout")
    sev_order = {"none": 0, "low": 1, "medium": 2, "high": 3}
    groups.sort(
        key=lambda g: (g.split("/")[0] == "none", g.split("/")[0], sev_order[g.split("/")[1]])
    )
    n_best = 500 if 500 in sizes else max(sizes)
    lines += [
        "",
        f"## Best method per scenario and severity at n={n_best}",
        "",
        "Accuracy: the model's accuracy on that pool (known classes only). Best ours = highest "
        "detection rate among our methods, each at alpha (ties: listed together); "
        f"{MONITOR_LABEL} = the shipped rule ({shipped_levels}); target = {MONITOR_LABEL} "
        ">= 0.95.",
        "",
        f"| scenario | severity | accuracy | best ours (rate) | {MONITOR_LABEL} "
        "| best baseline (rate) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    target_fail: list[str] = []
    target_power: dict[str, float] = {}
    for g in groups:
        scen, sev = g.split("/")
        r = {m: rates.loc[(g, n_best, m)] for m in methods}
        rate = {m: v["sum"] / v["count"] for m, v in r.items()}
        best_o = max(rate[m] for m in ours)
        best_b = max(rate[m] for m in methods if not _is_ours(m))
        names_o = ", ".join(m for m in ours if rate[m] == best_o)
        names_b = ", ".join(m for m in methods if not _is_ours(m) and rate[m] == best_b)
        k, c = mon_rates.loc[(g, n_best)]
        needs = sev in ("medium", "high")
        status = "-" if not needs else ("pass" if k / c >= 0.95 else "**FAIL**")
        if needs:
            target_power[g] = k / c
            if k / c < 0.95:
                target_fail.append(g)
        acc = accuracy.get(g, math.nan)
        lines.append(
            f"| {scen} | {sev} | {acc:.3f} | {names_o} ({best_o:.2f}) | {k / c:.2f} | "
            f"{names_b} ({best_b:.2f}) | {status} |"
        )
    fa_fail = [m for m in default if not fa_ok[m]]
    mon_fa = {n: mon_rates.loc[("heldout", n)] for n in sizes}
    mon_cells = []
    for n, v in mon_fa.items():
        lo, hi = wilson(int(v["sum"]), int(v["count"]))
        mon_cells.append(f"n={n} {v['sum'] / v['count']:.3f} [{lo:.3f}, {hi:.3f}]")
    fa_max = {
        m: max(
            rates.loc[("heldout", n, m)]["sum"] / rates.loc[("heldout", n, m)]["count"]
            for n in sizes
        )
        for m in ours
    }
    fa_incons = [m for m in default if not fa_consistent[m]]
    lines += [
        "",
        "## Target check (issue 5)",
        "",
        f"Checked on the **{MONITOR_LABEL}** (the shipped rule: "
        f"{' or '.join(default)}, at {shipped_levels}), on this benchmark's pools; the "
        "out-of-sample check on newly rendered images is `drift_fresh.md`.",
        "",
        f"- False alarms <= 5% for the {MONITOR_LABEL}, at every n: "
        + ("**pass**" if fa_ok[MONITOR] else "**FAIL**")
        + " on point estimates; statistically (lower 95% bound <= 5%): "
        + ("**pass**" if fa_consistent[MONITOR] else "**FAIL**")
        + " ("
        + "; ".join(mon_cells)
        + ").",
        f"- Every medium-or-stronger shift detected with >= 95% power at n={n_best} by the "
        f"{MONITOR_LABEL}: "
        + ("**pass**" if not target_fail else f"**FAIL** ({', '.join(target_fail)})")
        + (f" (minimum {min(target_power.values()):.2f})" if target_power else "")
        + ".",
        "- For reference, each default method alone at alpha (not the shipped rule): false "
        "alarms <= 5% at every n: "
        + ("pass" if not fa_fail else f"exceeded by {', '.join(fa_fail)}")
        + " on point estimates; lower 95% bound <= 5%: "
        + ("pass" if not fa_incons else f"exceeded by {', '.join(fa_incons)}")
        + "; the pair each at alpha: "
        + ("<= 5%" if fa_ok["any default"] else "above 5%")
        + " on point estimates. Our non-default methods (each at alpha): "
        + (", ".join(f"{m} max {fa_max[m]:.3f}" for m in ours if m not in default) or "none")
        + ".",
        "- Baselines whose false-alarm rate exceeds 5% at some n: "
        + (", ".join(m for m in methods if not _is_ours(m) and not fa_ok[m]) or "none"),
        "",
        *NOTES,
        f"## Full grid: detection rate (each method at alpha; {MONITOR_LABEL} = shipped rule; "
        "windows per cell in the last column)",
        "",
    ]
    for n in sizes:
        lines += [
            f"### n = {n}",
            "",
            "| scenario/severity | " + " | ".join(methods) + f" | {MONITOR_LABEL} | windows |",
            "|---|" + "---|" * (len(methods) + 2),
        ]
        for g in ["heldout"] + groups:
            cells = [
                f"{rates.loc[(g, n, m)]['sum'] / rates.loc[(g, n, m)]['count']:.2f}"
                for m in methods
            ]
            k, c = mon_rates.loc[(g, n)]
            lines.append(f"| {g} | " + " | ".join(cells) + f" | {k / c:.2f} | {int(c)} |")
        lines.append("")
    if verify_rows:
        lines += [
            "## Replica vs real Evidently legacy drift methods",
            "",
            "Same windows through `evidently.legacy.metrics.data_drift.embedding_drift_methods` "
            "(the objects `EmbeddingsDriftMetric` calls) and through the numpy replica used above.",
            "",
            "| method | same verdict | max score difference |",
            "|---|---|---|",
            *verify_rows,
            "",
        ]
    return "\n".join(lines)


def _accuracy(cache: str, groups: list[str]) -> dict[str, float]:
    data = _load(cache)
    out = {}
    for g in groups + ["heldout"]:
        t = data[f"{g}/target"] if g != "heldout" else None
        if t is None:
            t = np.concatenate([data[f"heldout_{p}/target"] for p in ("val", "test", "extra")])
        pred = data[f"{g}/bbsd"].argmax(1)
        known = t >= 0
        out[g] = float((pred[known] == t[known]).mean()) if known.any() else math.nan
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", default="/tmp/fresh/central_storage")
    ap.add_argument("--dataset", default="/tmp/fresh/datasets/demo-shapes")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--work", default="/tmp/fresh-shift")
    ap.add_argument("--split-seed", type=int, default=42, help="the training config's seed")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument("--null-windows", type=int, default=200)
    ap.add_argument(
        "--null-windows-small", type=int, default=1000, help="null windows for n <= 100 (cheap)"
    )
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--verify", type=int, default=3, help="windows per size and pool (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--from-csv", action="store_true", help="re-render the report from the last run's windows"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "drift_power.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cached = (Path(args.work) / f"embeddings_{args.model}.npz").exists()
    cache = str(prepare(args))
    t_prep = time.perf_counter() - t_start
    prep_note = "embeddings cache reused" if cached else "cached for later runs"
    data = _load(cache)
    groups = sorted({k.rsplit("/", 1)[0] for k in data if "/" in k.split("/", 1)[1]})
    groups = [g for g in groups if g.count("/") == 1 and not g.startswith(("ref", "heldout"))]
    groups = [g for g in groups if not g.startswith("check_train")]
    sizes = tuple(sorted(args.sizes))
    csv_path = Path(args.work) / "drift_power_windows.csv.gz"
    runtime_path = Path(args.work) / "drift_power_runtime.txt"
    if args.from_csv:
        df = pd.read_csv(csv_path)
        runtime = runtime_path.read_text(encoding="utf-8").strip()
    else:
        jobs = [
            (
                "heldout",
                n,
                args.null_windows_small if n <= 100 else args.null_windows,
                cache,
                args.seed,
            )
            for n in sizes
        ]
        jobs += [(g, n, args.windows, cache, args.seed) for g in groups for n in sizes]
        jobs.sort(key=lambda j: -j[1] * j[2])  # big ones first: better packing over workers
        t0 = time.perf_counter()
        rows: list[dict[str, object]] = []
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for i, part in enumerate(pool.imap_unordered(_task, jobs), 1):
                rows.extend(part)
                log.info("%d/%d: %s n=%d done", i, len(jobs), part[0]["group"], part[0]["n"])
        t_windows = time.perf_counter() - t0
        df = pd.DataFrame(rows)
        df.to_csv(csv_path, index=False)
        n_windows = df.groupby(["group", "n"])["window"].nunique().sum()
        runtime = (
            f"Run: {n_windows} windows ({len(df)} test verdicts) in {t_windows:.0f} s with "
            f"{args.jobs} worker process(es) (nice 10, 1 BLAS thread each, 2 shared cores, "
            f"other work running); data preparation {t_prep:.0f} s ({prep_note}). "
            f"Un-shifted pool: {len(data['heldout/uae'])} images; reference: "
            f"{len(data['ref/uae'])} training images."
        )
        runtime_path.write_text(runtime + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    verify_rows = verify(cache, args.verify, sizes) if args.verify else []
    runtime += f" Evidently cross-check: {time.perf_counter() - t0:.0f} s."
    text = report(df, sizes, runtime, _accuracy(cache, groups), verify_rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
