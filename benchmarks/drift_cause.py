"""Does the monitor name the right cause? Ranked drift causes on newly rendered images.

For every shipped shift scenario (``cvops.data.shift``: brightness, contrast, blur, noise,
background, class prior, unseen class) at medium and high severity, and for un-shifted images,
``--windows`` windows of ``--n`` images each go through the monitor's own cause analysis
(``cvops.monitor.check.explain_check`` -> ``cvops.monitor.causes.explain_drift`` and the
domain-classifier examples), and the top-ranked cause is compared with the injected one.

Data, built once under ``--work`` and cached:

- a model package made by the training code itself (``fit_model``, ``build_detectors``,
  ``save_package``, published to a local central storage): the shipped train config's
  small_cnn, fewer epochs, on a demo set rendered with ``--train-seed``; its reference parquet
  holds what a real package's does (softmax outputs, hidden features, labels, image
  properties of the training images);
- fresh images: a demo test split rendered with ``--seed`` (never used for training), large
  enough that the ``--windows`` windows of every scenario are disjoint (``--windows`` x ``--n``
  source images), shifted by ``generate_shift_scenarios`` with the same seed. Each image is
  read the way training and the service read it (``make_dataset``), predicted once (softmax and
  hidden features in one batched pass), and measured with the service's own
  ``input_properties``; the arrays are cached (``windows_seed<seed>_<n>x<windows>.npz``) and the
  rendered JPEGs deleted unless ``--keep-images``.

Windows are disjoint slices of a seeded permutation of each pool, except class prior: that
scenario resamples its source images (the dominant class ~4x over), so its windows draw rows
with distinct source images (no image twice in a window; sources recur across windows).

Expected cause per scenario: brightness -> brightness, contrast -> contrast, blur -> blur,
gaussian_noise -> noise, class_prior -> prediction_shift (the targets of issue 16); unseen_class
-> prediction_shift (new kinds of objects move the predicted classes, not a pixel statistic),
background -> sharpness or contrast (the checker/stripes backgrounds add high-contrast edges:
"sharper or more textured" and "higher in contrast" both describe them); these two are
reported, not targets.

    nice -n 10 .venv/bin/python benchmarks/drift_cause.py            # full run (~25 min)
    .venv/bin/python benchmarks/drift_cause.py --windows 5 --out /tmp/dc.md   # smoke run
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread: far faster on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cvops.data.properties import IMAGE_PROPERTIES  # noqa: E402
from cvops.monitor.causes import (  # noqa: E402
    CAUSE_ALPHA,
    NO_SINGLE_CAUSE,
    PREDICTION_CAUSE,
    CauseReport,
)
from cvops.monitor.check import (  # noqa: E402
    DriftCheck,
    Window,
    explain_check,
    load_reference,
    load_reference_extras,
)
from cvops.storage import CentralStorage, ModelMetadata  # noqa: E402

log = logging.getLogger("drift_cause")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "drift_cause_shapes_50px"
SEVERITIES = ("medium", "high")
BASELINE = "none/none"
# scenario -> the cause the monitor should rank first
EXPECTED: dict[str, tuple[str, ...]] = {
    "brightness": ("brightness",),
    "contrast": ("contrast",),
    "blur": ("blur",),
    "gaussian_noise": ("noise",),
    "class_prior": (PREDICTION_CAUSE,),
    "unseen_class": (PREDICTION_CAUSE,),
    # the checker/stripes backgrounds add high-contrast edges: both describe them
    "background": ("sharpness", "contrast"),
}
TARGETS = ("brightness", "contrast", "blur", "gaussian_noise", "class_prior")  # at medium
SCENARIO_ORDER = (*TARGETS, "background", "unseen_class")
# Written from the runs (tuning on seed 7 with 25 windows, this file's seed 8 before and after;
# the package retrained with today's training settings, 200 un-shifted windows).
NOTES = [
    "## Notes",
    "",
    "- Package: retrained with the current shipped training settings (plateau patience 4, "
    "early stopping patience 8; test accuracy 0.880). The previous package (test accuracy "
    "0.900) was trained before those defaults changed (patience 2 and 5). On the same seed-8 "
    "windows, at cause_alpha 0.05, the two agree on the targets (medium 250/250 each; "
    "un-shifted 188/200 each, "
    "naming the same causes: the properties do not depend on the model, and the reference "
    "images are the same); they differ on background/medium ('higher in contrast' 11, "
    "'sharper or more textured' 39; was 15 and 35), unseen_class/medium (prediction shift 9 "
    "of 50; was 13) and unseen_class/high (46 of 50; was 50: 2 'no single cause', 1 'sharper "
    "or more textured', 1 'less saturated').",
    "- Cause level (`monitor.cause_alpha`, default 0.01; the drift verdict keeps `alpha` "
    "0.05): naming a cause needs stronger evidence than flagging drift. At cause_alpha 0.05 "
    "(the level until now, `--cause-alpha 0.05`) un-shifted windows got 'no single cause' in "
    "188/200 = 94.0% [95% CI 89.8%, 96.5%] on both packages, below the >= 95% target: a "
    "family-wise error rate of 5% gives at best ~95% on average, and all windows share one "
    "reference sample, whose chance deviations count against every window (the pooled p-values "
    "below: width, aspect and sharpness lowest, the tests that fired most; the 12 causes named "
    "at corrected p between 0.002 and 0.05, width ('size') 4 times). The tests themselves are "
    "calibrated: the property KS p-values (asymptotic, at the effective sizes) equal scipy's "
    "exact two-sample p-values (2200 tests: 6.1% below 0.05 either way, median ratio 1.01; a "
    "one-off check), and the Bonferroni correction counts the properties and the prediction "
    "shift together (12 tests). At 0.05, 40 references drawn from the fresh images (property "
    "tests only) gave a false-cause rate of mean 3.2%, sd 2.1%, range 0-8%, 20% of references "
    "above 5%: the average is below the level, single references scatter by about 2 points. "
    "A level whose mean false-cause rate sits more than two such spreads below 5% keeps the "
    "target for nearly every reference; 0.01 does (spread below) and loses no power on the "
    "target scenarios (every medium target row 50/50, as at 0.05). What it costs: the weaker "
    "signals, unseen_class/medium's prediction shift (9 of 50 windows at 0.05, 2 at 0.01; "
    "the embedding verdict still flags those windows).",
    "- Ranking change (`cvops.monitor.causes.prediction_leads`, tuned on seed 7, measured on "
    "seed 8 with the previous package): the prediction shift ranks first when its total "
    "variation distance (share of predictions that changed class) exceeds the leading "
    "property's KS distance, both 'what share of the window moved'. Before it, a significant "
    "property always ranked first. Seed 8 before -> after: class_prior/medium 47 -> 50 "
    "(misses: 'wider in pixels', width +9..17%), class_prior/high 45 -> 50 "
    "(contrast -8%, aspect +6%), unseen_class/high 28 -> 50 (named 'less saturated' 9, "
    "'noisier' 6, 'sharper or more textured' 6, 'blurrier' 1: the thin spiral and lightning "
    "shapes really do change those properties (KS ~0.15-0.22 on seed 7), while a larger "
    "share of the predictions moved), unseen_class/medium 10 -> 13; no window of another "
    "scenario changed its top cause, and the target figure went 98.8% -> 100%.",
    "- unseen_class/medium (30% new shapes) is mostly 'no single cause': the predicted-class "
    "shares of 200 images do not move enough for the chi-square at alpha / 12, and the shapes "
    "move no property enough either. The model's confidence does drop (KS on the top "
    "probability significant in 19 of 25 seed-7 windows, previous package), but confidence is "
    "not a cause test on purpose: the reference is the training images, on which the model is "
    "more confident than on any new image (previous package: mean 0.64 vs 0.62 on un-shifted "
    "fresh windows, already significant in 1 of 25 un-shifted windows at n = 200 and growing "
    "with n), so it would name a cause on un-shifted traffic. The embedding verdict still "
    "flags these windows (`drift_fresh.md`: unseen_class/medium 0.90-1.00 at n = 500).",
    "- background: 60% re-rendered backgrounds read as 'higher in contrast' or 'sharper or "
    "more textured' (table); both describe the checker/stripes backgrounds.",
    "- blur is named through the noise estimate ('blurrier (less fine detail)', noise -80%) "
    "more often than through sharpness: Immerkaer's estimate measures the finest detail, "
    "which blur removes first.",
]
CAUSE_ORDER = (
    "brightness",
    "contrast",
    "blur",
    "noise",
    "sharpness",
    "saturation",
    "colour",
    "size",
    "aspect",
    PREDICTION_CAUSE,
    NO_SINGLE_CAUSE,
)


# --------------------------------------------------------------------------- the model package


def train_package(args: argparse.Namespace) -> tuple[CentralStorage, str]:
    """A small model package made by the training code, published to ``<work>/central_storage``
    (reused when there)."""
    work = Path(args.work)
    storage = CentralStorage(work / "central_storage")
    metadata_file = f"{MODEL}.yaml"
    if storage.metadata_path(metadata_file).is_file():
        return storage, metadata_file
    import keras
    import yaml

    from cvops.config import FlowConfig
    from cvops.data.demo import generate_demo_dataset
    from cvops.model.train import (
        build_detectors,
        fit_model,
        load_splits,
        save_package,
        split_dataset,
    )
    from cvops.storage import utc_now

    t0 = time.perf_counter()
    data = work / f"train_seed{args.train_seed}"
    generate_demo_dataset(
        data,
        n_train_per_class=args.train_per_class,
        n_test_per_class=args.train_per_class // 5,
        seed=args.train_seed,
    )
    raw = yaml.safe_load((ROOT / "configs" / "train_flow.yaml").read_text(encoding="utf-8"))
    raw["model"].update(model_name=MODEL, save_dir=str(work / "package"))
    raw["dataset"]["ds_root"] = str(work)
    raw["train"]["hparams"]["epochs"] = args.epochs
    cfg = FlowConfig.model_validate(raw)
    assert cfg.model is not None
    splits = load_splits(cfg, data)
    model, history = fit_model(cfg, splits)
    accuracy = model.evaluate(split_dataset(cfg, splits.test, batch_size=256), verbose=0)[1]
    log.info("trained %d epochs in %.0f s: test accuracy %.3f", len(history["loss"]),
             time.perf_counter() - t0, accuracy)  # fmt: skip
    uae, bbsd, ref = build_detectors(cfg, model, splits)
    names = CentralStorage.artifact_names(MODEL, cfg.model.drift_detection)
    files = save_package(cfg.model.save_dir, MODEL, names, model, uae, bbsd, ref)
    meta = ModelMetadata(
        **cfg.model.model_dump(mode="json", exclude={"save_dir"}),
        **names,
        version="1",
        metrics={"test_accuracy": float(accuracy)},
        created_on=utc_now(),
    )
    storage.publish(files, meta)
    (work / TRAIN_RECORD).write_text(json.dumps(train_settings(cfg), indent=1), encoding="utf-8")
    keras.backend.clear_session()
    return storage, metadata_file


TRAIN_RECORD = "package_train_settings.json"
TIMINGS = "timings.json"


def train_settings(cfg: object) -> dict[str, object]:
    """The training settings that decide the model (the schedule, early stopping, augmentation)."""
    train = cfg.train  # type: ignore[attr-defined]
    return train.model_dump(mode="json", include={"hparams", "augmentation", "early_stopping",
                                                  "lr_schedule", "class_weight"})  # fmt: skip


def current_train_settings(args: argparse.Namespace) -> dict[str, object]:
    import yaml

    from cvops.config import FlowConfig

    raw = yaml.safe_load((ROOT / "configs" / "train_flow.yaml").read_text(encoding="utf-8"))
    raw["train"]["hparams"]["epochs"] = args.epochs
    return train_settings(FlowConfig.model_validate(raw))


def training_note(work: Path, args: argparse.Namespace) -> str:
    """Whether the cached package was trained with today's shipped training settings."""
    record = work / TRAIN_RECORD
    if not record.exists():
        return (
            "training settings not recorded (a package from before the benchmark recorded "
            "them; delete --work's central_storage to retrain)"
        )
    used, now = json.loads(record.read_text(encoding="utf-8")), current_train_settings(args)
    changed = [k for k in now if used.get(k) != now[k]]
    if not changed:
        return "trained with the current shipped training settings"
    return "trained with older training settings (" + ", ".join(changed) + " changed since)"


def record_timing(work: Path, cache: Path, seconds: float) -> None:
    path = work / TIMINGS
    timings = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    timings[cache.name] = round(seconds)
    path.write_text(json.dumps(timings, indent=1), encoding="utf-8")


def timing_note(work: Path, args: argparse.Namespace, meta: ModelMetadata) -> str:
    """How long building the cached windows took, when they come from the cache."""
    path = work / TIMINGS
    timings = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    tag = model_tag(meta)
    names = [f"windows_seed{args.seed}_{args.n}x{args.windows}_{tag}.npz"]
    if args.null_windows and args.null_windows > args.windows:
        names.append(f"null_seed{args.seed}_{args.n}x{args.null_windows}_{tag}.npz")
    if not all((work / name).exists() for name in names):
        return ""
    labels = ("scenario windows", "un-shifted windows")
    built = [
        f"{label} built in {timings[n] / 60:.0f} min"
        for label, n in zip(labels, names, strict=False)
        if n in timings
    ]
    if not built:
        return " (windows from the cache)"
    return f" (windows from the cache; {', '.join(built)} on 2 shared cores)"


# --------------------------------------------------------------------------- fresh windows


@dataclass
class Pool:
    """One scenario/severity's images: softmax outputs, hidden features, properties (one
    column per IMAGE_PROPERTIES name) and the source image each row was made from."""

    probs: np.ndarray
    hidden: np.ndarray
    props: np.ndarray
    source: np.ndarray


def model_tag(meta: ModelMetadata) -> str:
    """The packaged model's hash prefix: window caches hold its outputs, so a retrained model
    never reuses another model's arrays."""
    return (meta.sha256 or {}).get("model_path", "unhashed")[:8]


def measurer(
    storage: CentralStorage, meta: ModelMetadata
) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """paths -> (softmax, hidden features, properties): what the service computes per upload,
    the BBSD output (the package's bbsd model is this layer of the classifier, `build_bbsd`)
    and the hidden features in one batched pass, the properties by `input_properties`."""
    import keras
    import tensorflow as tf

    from cvops.data.properties import image_size, input_properties
    from cvops.model.pipeline import make_dataset

    model = keras.models.load_model(storage.resolve(meta.model_path), compile=False)
    drift = meta.drift_detection
    bbsd_out = model.layers[drift.bbsd_layer_idx].output
    hidden_out = model.get_layer(drift.hidden_layer).output
    both = keras.Model(model.input, [bbsd_out, hidden_out])
    size = (meta.input_size.h, meta.input_size.w)
    step = tf.function(lambda x: both(x, training=False), reduce_retracing=True)

    def measure(paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sizes = [image_size(p) for p in paths]
        probs, hidden, props = [], [], []
        for x, _ in make_dataset(paths, [0] * len(paths), size, 256, cache=False):
            p, h = step(x)
            probs.append(p.numpy())
            hidden.append(h.numpy())
            for image in x.numpy():
                w, hgt = sizes[len(props)]
                measured = input_properties(image, w, hgt)
                props.append([measured[name] for name in IMAGE_PROPERTIES])
        return np.concatenate(probs), np.concatenate(hidden), np.asarray(props, np.float64)

    return measure


def build_null_pool(args: argparse.Namespace, storage: CentralStorage, meta: ModelMetadata) -> Pool:
    """Un-shifted images only, enough for ``--null-windows`` disjoint windows: the demo test
    split of ``--seed`` rendered larger (the scenario pools' un-shifted images are its first
    ``--windows`` x ``--n``: same seed, same image per index); cached in ``--work``."""
    from cvops.data.demo import generate_demo_dataset

    work = Path(args.work)
    per_class = math.ceil(args.null_windows * args.n / len(meta.classes))
    cache = work / f"null_seed{args.seed}_{args.n}x{args.null_windows}_{model_tag(meta)}.npz"
    if not cache.exists():
        started = t0 = time.perf_counter()
        data_dir = work / f"fresh_null_seed{args.seed}"
        csv = generate_demo_dataset(
            data_dir, n_train_per_class=0, n_test_per_class=per_class, seed=args.seed
        )
        paths = [str(data_dir / p) for p in pd.read_csv(csv)["path"]]
        log.info("rendered %d un-shifted images in %.0f s", len(paths), time.perf_counter() - t0)
        t0 = time.perf_counter()
        probs, hidden, props = measurer(storage, meta)(paths)
        log.info("predicted and measured them in %.0f s", time.perf_counter() - t0)
        record_timing(work, cache, time.perf_counter() - started)
        np.savez_compressed(
            cache,
            probs=probs.astype(np.float32),
            hidden=hidden.astype(np.float32),
            props=props,
            source=np.asarray([Path(p).name for p in paths]),
        )
        if not args.keep_images:
            shutil.rmtree(data_dir)
    with np.load(cache, allow_pickle=False) as npz:
        return Pool(npz["probs"], npz["hidden"], npz["props"], npz["source"])


def build_pools(
    args: argparse.Namespace, storage: CentralStorage, meta: ModelMetadata
) -> dict[str, Pool]:
    """Render, shift, predict and measure every image once; cached in ``--work``."""
    work = Path(args.work)
    per_class = math.ceil(args.windows * args.n / len(meta.classes))
    cache = work / f"windows_seed{args.seed}_{args.n}x{args.windows}_{model_tag(meta)}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as npz:
            groups = sorted({k.rsplit("/", 1)[0] for k in npz.files})
            return {
                g: Pool(*(npz[f"{g}/{f}"] for f in ("probs", "hidden", "props", "source")))
                for g in groups
            }
    from cvops.data.demo import generate_demo_dataset
    from cvops.data.shift import generate_shift_scenarios

    started = t0 = time.perf_counter()
    data_dir, scen_dir = work / f"fresh_seed{args.seed}", work / f"scenarios_seed{args.seed}"
    csv = generate_demo_dataset(
        data_dir, n_train_per_class=0, n_test_per_class=per_class, seed=args.seed
    )
    generate_shift_scenarios(
        data_dir / "test", scen_dir, annotations=csv, seed=args.seed, severities=SEVERITIES
    )
    log.info("rendered %d source images and their shifts in %.0f s", per_class * 10,
             time.perf_counter() - t0)  # fmt: skip
    measure = measurer(storage, meta)
    manifest = pd.read_csv(scen_dir / "manifest.csv", keep_default_na=False)
    arrays: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()

    # the un-shifted images first: every unchanged copy in a scenario (class prior, the kept
    # images of background and unseen class) is the same bytes, so it reuses their row
    groups = manifest.groupby(["scenario", "severity"], sort=False)
    baseline = groups.get_group(tuple(BASELINE.split("/")))
    base = measure([str(scen_dir / p) for p in baseline["path"]])
    row_of = {src: i for i, src in enumerate(baseline["source"])}
    predicted = len(baseline)
    for (scenario, severity), rows in groups:
        group = f"{scenario}/{severity}"
        shifted = rows["shifted"].to_numpy() == 1
        copies = np.array([row_of.get(s, -1) for s in rows["source"]])
        if ((copies < 0) & ~shifted).any():
            raise RuntimeError(f"{group}: unchanged rows without their un-shifted source")
        measured = [a[np.maximum(copies, 0)].copy() for a in base]
        if shifted.any():
            fresh = measure([str(scen_dir / p) for p in rows["path"][shifted]])
            for whole, part in zip(measured, fresh, strict=True):
                whole[shifted] = part
            predicted += int(shifted.sum())
        for name, values in zip(("probs", "hidden"), measured[:2], strict=True):
            arrays[f"{group}/{name}"] = values.astype(np.float32)
        arrays[f"{group}/props"] = measured[2]
        # the source image (generated unseen shapes have none: their own path)
        arrays[f"{group}/source"] = np.where(
            rows["source"].to_numpy() == "", rows["path"].to_numpy(), rows["source"].to_numpy()
        ).astype(str)
        log.info("%s: %d images, %d shifted", group, len(rows), int(shifted.sum()))
    log.info("predicted and measured %d images in %.0f s", predicted,
             time.perf_counter() - t0)  # fmt: skip
    np.savez_compressed(cache, **arrays)
    record_timing(work, cache, time.perf_counter() - started)
    if not args.keep_images:
        shutil.rmtree(data_dir)
        shutil.rmtree(scen_dir)
    return build_pools(args, storage, meta)


def window_indices(pool: Pool, group: str, n: int, windows: int) -> list[np.ndarray]:
    """Disjoint windows of a seeded permutation; rows of distinct source images within each
    window where the pool repeats sources (class prior)."""
    rng = np.random.default_rng(zlib.crc32(group.encode()))
    size = len(pool.source)
    if len(np.unique(pool.source)) == size:
        order = rng.permutation(size)
        return [order[w * n : (w + 1) * n] for w in range(min(windows, size // n))]
    out = []
    for _ in range(windows):
        order = rng.permutation(size)
        _, first = np.unique(pool.source[order], return_index=True)
        out.append(order[np.sort(first)[:n]])
    return out


# --------------------------------------------------------------------------- the monitor's analysis


def explain_window(
    pool: Pool,
    idx: np.ndarray,
    reference: dict[str, np.ndarray],
    extras: object,
    meta: ModelMetadata,
    seed: int,
    alpha: float = CAUSE_ALPHA,
) -> CauseReport:
    """The monitor's cause analysis of one window (`explain_check`), as a window read from
    the prediction database would give it: predicted class = softmax argmax, the BBSD and
    hidden features, the image properties. The embedding tests are not run (their power is
    `drift_power_fresh.py`'s subject); `explain_check` only needs to know that the hidden
    features were tested, to pick its example images on them."""
    probs = pool.probs[idx].astype(np.float64)
    window = Window(
        uae=np.empty((len(idx), 0)),
        bbsd=probs,
        start=None,
        end=None,
        ids=[str(i) for i in idx],
        predicted=[meta.classes[j] for j in probs.argmax(1)],
        hidden=pool.hidden[idx].astype(np.float64),
        props=[dict(zip(IMAGE_PROPERTIES, row, strict=True)) for row in pool.props[idx]],
    )
    check = DriftCheck("benchmark", MODEL, meta.version, window, len(reference["bbsd"]))
    check.results["hidden"] = []
    return explain_check(check, reference, extras, meta.classes, alpha=alpha, seed=seed)  # type: ignore[arg-type]


@dataclass
class Outcome:
    group: str
    window: int
    named: str
    ranked: list[str]
    sentence: str
    examples: list[str]
    p_adjusted: float | None = None  # the named cause's corrected p-value


def top_p(report: CauseReport) -> float | None:
    """The corrected p-value of the report's top cause (None: no cause)."""
    if report.top_cause is None:
        return None
    if report.top_cause == PREDICTION_CAUSE and report.prediction is not None:
        return report.prediction.p_adjusted
    return next(
        (p.p_adjusted for p in report.properties if p.significant and p.explained_by is None),
        None,
    )


def evaluate(
    pools: dict[str, Pool], storage: CentralStorage, meta: ModelMetadata, args: argparse.Namespace
) -> list[Outcome]:
    reference = load_reference(storage, meta)
    extras = load_reference_extras(storage, meta)
    outcomes = []
    for group in sorted(pools, key=_group_order):
        t0 = time.perf_counter()
        windows = args.null_windows if group == BASELINE else args.windows
        for w, idx in enumerate(window_indices(pools[group], group, args.n, windows)):
            report = explain_window(
                pools[group], idx, reference, extras, meta, seed=w, alpha=args.cause_alpha
            )
            outcomes.append(
                Outcome(
                    group,
                    w,
                    report.top_cause or NO_SINGLE_CAUSE,
                    report.ranked_causes,
                    report.sentence,
                    [e.predicted_class or "" for e in report.examples],
                    top_p(report),
                )
            )
        named = Counter(o.named for o in outcomes if o.group == group)
        log.info("%s (%.1f s): %s", group, time.perf_counter() - t0, dict(named))
    return outcomes


def reference_spread(
    pool: Pool, meta: ModelMetadata, args: argparse.Namespace, reference: pd.DataFrame
) -> list[str]:
    """How much the false-cause rate of the property tests depends on the one reference
    sample every window is tested against: `--reference-draws` references of as many fresh
    un-shifted images as the package's reference, each with `--windows` disjoint windows of the
    rest, the properties tested as `explain_drift` does (re-weighted to the window's predicted
    classes, at alpha / (properties + 1))."""
    from cvops.monitor.causes import property_shifts

    frame = pd.DataFrame(pool.props, columns=list(IMAGE_PROPERTIES))
    classes = np.asarray(meta.classes, dtype=object)[pool.probs.argmax(1)]
    size = args.reference_rows
    rng = np.random.default_rng(args.seed)
    rates = []
    for _ in range(args.reference_draws):
        order = rng.permutation(len(frame))
        ref, rest = order[:size], order[size:]
        windows = min(args.windows, len(rest) // args.n)
        hits = 0
        for w in range(windows):
            idx = rest[w * args.n : (w + 1) * args.n]
            shifts = property_shifts(
                frame.iloc[ref].reset_index(drop=True),
                frame.iloc[idx].reset_index(drop=True),
                args.cause_alpha,
                len(IMAGE_PROPERTIES) + 1,
                reference_groups=classes[ref],
                window_groups=classes[idx],
            )
            hits += any(s.significant for s in shifts)
        rates.append(hits / windows)
    r = np.asarray(rates)
    from scipy import stats

    pooled = ", ".join(
        f"{name} {stats.ks_2samp(reference[name], frame[name]).pvalue:.2f}"
        for name in IMAGE_PROPERTIES
        if name in reference.columns
    )
    return [
        f"- The package's reference against all {len(frame)} un-shifted images (KS p-value "
        f"per property; the tests' null hypothesis, one sample each): {pooled}.",
        f"- Reference spread (`--reference-draws {args.reference_draws}`): {len(r)} references "
        f"of {size} fresh un-shifted images, {windows} windows of n = {args.n} each, property "
        f"tests only: false-cause rate mean {r.mean():.1%}, sd {r.std():.1%}, range "
        f"{r.min():.0%}-{r.max():.0%}; {np.mean(r > args.cause_alpha):.0%} of the references "
        f"above {args.cause_alpha:.0%}, {np.mean(r > 0.05):.0%} above 5% (the target's "
        "complement).",
    ]


# --------------------------------------------------------------------------- the report


def _group_order(group: str) -> tuple[int, int]:
    scenario, severity = group.split("/")
    if group == BASELINE:
        return (-1, 0)
    return (SCENARIO_ORDER.index(scenario), SEVERITIES.index(severity))


def expected(group: str) -> tuple[str, ...]:
    """The causes counted as right for a group's windows."""
    return (NO_SINGLE_CAUSE,) if group == BASELINE else EXPECTED[group.split("/")[0]]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion(outcomes: list[Outcome], groups: list[str]) -> list[str]:
    seen = {o.named for o in outcomes}
    columns = [c for c in CAUSE_ORDER if c in seen] + sorted(seen - set(CAUSE_ORDER))
    lines = [
        "| injected \\ named first | " + " | ".join(columns) + " | right [95% CI] | in top 2 |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for group in groups:
        rows = [o for o in outcomes if o.group == group]
        counts = Counter(o.named for o in rows)
        want = expected(group)
        hits = sum(counts[c] for c in want)
        top2 = sum(bool(set(want) & set(o.ranked[:2] or [o.named])) for o in rows)
        lo, hi = wilson(hits, len(rows))
        cells = [
            (f"**{counts[c]}**" if c in want else str(counts[c])) if counts[c] else "\u00b7"
            for c in columns
        ]
        label = f"{group} \u2192 {' or '.join(want)}"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {hits}/{len(rows)} = {hits / len(rows):.0%}"
            f" [{lo:.0%}, {hi:.0%}] | {top2}/{len(rows)} |"
        )
    return lines


def report(
    outcomes: list[Outcome],
    args: argparse.Namespace,
    meta: ModelMetadata,
    seconds: float,
    reference_rows: int,
) -> str:
    groups = sorted({o.group for o in outcomes}, key=_group_order)
    n_windows = Counter(o.group for o in outcomes)
    target_groups = [f"{s}/medium" for s in TARGETS if f"{s}/medium" in n_windows]
    target = [o for o in outcomes if o.group in target_groups]
    target_hits = sum(o.named in expected(o.group) for o in target)
    null = [o for o in outcomes if o.group == BASELINE]
    null_hits = sum(o.named == NO_SINGLE_CAUSE for o in null)
    accuracy = meta.metrics.get("test_accuracy", math.nan)
    null_flag = f"--null-windows {args.null_windows} " if args.null_windows != args.windows else ""
    if args.cause_alpha != CAUSE_ALPHA:
        null_flag += f"--cause-alpha {args.cause_alpha:g} "
    if getattr(args, "reference_draws", 0):
        null_flag += f"--reference-draws {args.reference_draws} "
    null_text = f" ({args.null_windows} un-shifted)" if args.null_windows != args.windows else ""
    null_lo, null_hi = wilson(null_hits, len(null))
    lines = [
        "# Drift causes: is the injected cause ranked first?",
        "",
        f"Generated by `benchmarks/drift_cause.py --seed {args.seed} --windows {args.windows} "
        f"{null_flag}--n {args.n}` in {seconds / 60:.0f} min{args.timing}. Model: the shipped "
        "train config's small_cnn, "
        f"{args.epochs} epochs on {args.train_per_class} demo images per class (seed "
        f"{args.train_seed}), packaged by the training code (test accuracy {accuracy:.3f}; "
        f"{args.training}); reference = its {reference_rows} training images. Windows: "
        f"{args.windows} of n = {args.n} per scenario and severity{null_text}, newly rendered "
        "images "
        f"(seed {args.seed}, shifted by `cvops.data.shift`), disjoint within a scenario (class "
        "prior: distinct source images within a window). Every window goes through the "
        f"monitor's own `explain_check` (cause_alpha {args.cause_alpha:g}, Bonferroni over the "
        "properties and the "
        "prediction shift); the table counts its top cause (`no single cause` when nothing is "
        "significant). Bold: the expected cause. `in top 2`: the expected cause among the first "
        "two ranked causes.",
        "",
        *confusion(outcomes, groups),
        "",
        f"Targets (issue 16): the injected cause first in >= 90% of windows for brightness, "
        f"contrast, blur, noise and class prior at medium severity: {target_hits}/{len(target)}"
        f" = {target_hits / max(1, len(target)):.1%}; un-shifted windows named 'no single "
        f"cause' in >= 95%: {null_hits}/{len(null)} = {null_hits / max(1, len(null)):.1%} "
        f"[95% CI {null_lo:.1%}, {null_hi:.1%}].",
        "",
        "## Misses",
        "",
    ]
    misses = [o for o in outcomes if o.named not in expected(o.group)]
    if not misses:
        lines.append("None.")
    for group in groups:
        missed = [o for o in misses if o.group == group]
        if not missed:
            continue
        named = Counter(o.named for o in missed)
        summary = ", ".join(f"{c} {k}" for c, k in named.most_common())
        lines.append(f"- **{group}** ({len(missed)} of {n_windows[group]}: {summary}), e.g.:")
        if group == BASELINE:  # which test fired on un-shifted images, and how clearly
            fired = ", ".join(
                f"{o.named} {o.p_adjusted:.3f}"
                for o in sorted(missed, key=lambda o: o.p_adjusted or 0.0)
                if o.p_adjusted is not None
            )
            lines.append(f"  - corrected p-value of the named cause per window: {fired}")
        for o in missed[: args.examples]:
            ranked = " > ".join(o.ranked) or "-"
            lines.append(f"  - window {o.window} (ranked: {ranked}): \u201c{o.sentence}\u201d")
    lines += ["", "## Example sentences (first window of each medium scenario)", ""]
    for group in groups:
        if group.endswith("/medium") or group == BASELINE:
            o = next(o for o in outcomes if o.group == group)
            shown = ", ".join(o.examples[:4])
            lines.append(f"- {group}: \u201c{o.sentence}\u201d (top examples predicted: {shown})")
    lines += ["", *NOTES, *getattr(args, "spread", [])]
    rate = target_hits / max(1, len(target))
    lines += ["", f"injected cause ranked first at medium severity: {rate:.1%}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/drift-cause")
    ap.add_argument("--seed", type=int, default=8, help="fresh images (7 was used for tuning)")
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument(
        "--null-windows",
        type=int,
        default=None,
        help="un-shifted windows (default: --windows); more pin the 'no single cause' rate, "
        "from a separate, larger rendering of the same seed's un-shifted images",
    )
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument(
        "--reference-draws",
        type=int,
        default=0,
        help="also draw this many references from the un-shifted images (needs "
        "--null-windows large enough) and report the spread of the false-cause rate",
    )
    ap.add_argument(
        "--cause-alpha",
        type=float,
        default=CAUSE_ALPHA,
        help="family-wise level of the cause tests (MonitorConfig.cause_alpha's default)",
    )
    ap.add_argument("--train-seed", type=int, default=42)
    ap.add_argument("--train-per-class", type=int, default=250)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--examples", type=int, default=3, help="missed windows quoted per group")
    ap.add_argument("--keep-images", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "drift_cause.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    storage, metadata_file = train_package(args)
    meta = storage.load_metadata(metadata_file)
    args.timing = timing_note(Path(args.work), args, meta)
    args.training = training_note(Path(args.work), args)
    pools = build_pools(args, storage, meta)
    if args.null_windows is None:
        args.null_windows = args.windows
    elif args.null_windows > len(pools[BASELINE].source) // args.n:
        pools[BASELINE] = build_null_pool(args, storage, meta)
    outcomes = evaluate(pools, storage, meta, args)
    if args.reference_draws:
        ref_props = load_reference_extras(storage, meta).properties
        args.reference_rows = len(ref_props)
        args.spread = reference_spread(pools[BASELINE], meta, args, ref_props)
    rows = len(load_reference(storage, meta)["bbsd"])
    text = report(outcomes, args, meta, time.perf_counter() - t0, rows)
    Path(args.out).write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
