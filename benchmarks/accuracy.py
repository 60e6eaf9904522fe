"""Accuracy per backbone at a fixed CPU-time budget, beside its size and serving compute floor.

Each backbone (`model.backbone`) trains through cvops' own training code (`load_splits` and
`fit_model`: the backbone build, the tf.data pipeline with augmentation, early stopping, the
learning-rate schedule, two-phase fine-tuning for a weights file) on two datasets:

- demo: the synthetic demo dataset (`cvops data demo`: 250 train / 60 test images per class,
  10 classes), at the demo config's 50x50;
- digits: scikit-learn's `load_digits` (1,797 real 8x8 greyscale handwritten digits shipped
  inside the scikit-learn wheel, no download), written as 8x8 PNGs and upscaled to 64x64 RGB by
  the shared `preprocess_image` (bilinear); a fixed stratified split of 1,400 train (10 % of it
  validation, as `dataset.val_fraction`) and 397 test; horizontal flip off (a mirrored digit is
  not a digit).

The training section is the demo config's (`configs/train_flow.yaml`: augmentation, early
stopping, lr schedule, batch size, lr) with `hparams.epochs` raised to a cap, so the budget, early
stopping or the cap ends training. The budget is process CPU time (`time.process_time()`, all
threads) from the start of `fit_model`; a Keras callback stops training at the first batch
after it is used (one batch and the epoch's validation pass may run past it, so the reported CPU
seconds are a little above the budget). Wall seconds are reported beside it.

Besides the from-scratch rows (`weights: none`), "pretrained" rows fine-tune on digits from a
local weights file made here (no network, so no ImageNet weights): the backbone of the demo row's
trained model, saved without its top, loaded with `model.weights: <that file>` through the
normal two-phase path (`train.finetune.*` defaults).

Serving compute floor: the service's compiled inference step (`compile_inference`: probabilities
+ Grad-CAM + UAE + BBSD + hidden features) on the saved and reloaded model, images/s at batch 1
and 32 after warm-up (wall clock; CPU ms per image at batch 32 beside it, which contention from
other processes does not inflate).

Rows are cached as JSON in --work-dir, so an interrupted run resumes; the table is written from
every cached row. Run it niced (the budget is CPU time, so niceness does not change it):

    nice -n 19 .venv/bin/python benchmarks/accuracy.py            # make bench-accuracy
    nice -n 19 .venv/bin/python benchmarks/accuracy.py --only digits:small_cnn --fresh
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cvops.config import Backbone

REPO = Path(__file__).resolve().parents[1]
BACKBONES = typing.get_args(Backbone)  # every backbone the config accepts, in its order
PRETRAINED = ("small_cnn", "mobilenet_v3_small")  # fine-tuned on digits from their demo backbone
# the largest families train at --heavy-factor x the budget (default 0.5) to keep the whole run
# near an hour on 2 cores; on 2 cores they get only a few epochs either way
HEAVY = ("mobilenet_v3_large", "efficientnet_v2_b0", "resnet50")
DATASETS = {"demo": 50, "digits": 64}  # input side
DIGITS_TEST = 397  # 1,797 - 1,400
# rows measured before fit_model re-estimated BatchNorm statistics (marked in the table)
BEFORE_PRECISE_BN = "before-precise-bn"


@dataclass
class Row:
    dataset: str
    backbone: str
    weights: str  # none | demo-pretrained
    budget_cpu_s: float
    accuracy: float = float("nan")
    auc: float = float("nan")
    cpu_s: float = float("nan")
    wall_s: float = float("nan")
    epochs: int = 0
    stopped_by: str = ""
    best_val_loss: float = float("nan")
    params: int = 0
    keras_mb: float = float("nan")
    serve_b1: float = float("nan")  # images/s, wall
    serve_b32: float = float("nan")
    serve_b32_cpu_ms: float = float("nan")  # CPU ms per image at batch 32
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return row_key(self.dataset, self.backbone, self.weights)


def row_key(dataset: str, backbone: str, weights: str) -> str:
    return f"{dataset}:{backbone}" + ("" if weights == "none" else f":{weights}")


# --- data ------------------------------------------------------------------------------------


def write_demo(root: Path) -> Path:
    from cvops.data.demo import generate_demo_dataset

    if not (root / "annotations.csv").is_file():
        generate_demo_dataset(root, n_train_per_class=250, n_test_per_class=60, seed=0)
    return root


def write_digits(root: Path) -> Path:
    """load_digits as 8x8 greyscale PNGs in <root>/{train,test}/<digit>/, stratified split."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if (root / "done").is_file():
        return root
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    index = np.arange(len(pixels))
    train, test = train_test_split(
        index, test_size=DIGITS_TEST, stratify=digits.target, random_state=0
    )
    for split, members in (("train", train), ("test", test)):
        for i in sorted(members):
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(folder / f"digit_{i:04d}.png")
    (root / "done").write_text("ok\n")
    return root


# --- training ----------------------------------------------------------------------------------


def make_config(dataset: str, backbone: str, weights: str, data_root: Path, max_epochs: int) -> Any:
    from cvops.config import parse_config

    base = yaml.safe_load((REPO / "configs" / "train_flow.yaml").read_text())
    train = base["train"]
    train["hparams"]["epochs"] = max_epochs
    if dataset == "digits":
        train["augmentation"]["horizontal_flip"] = False
        classes = [str(d) for d in range(10)]
    else:
        classes = base["model"]["classes"]
    side = DATASETS[dataset]
    return parse_config(
        {
            "flow_module": "cvops.flows.train_flow",
            "seed": base.get("seed", 42),
            "model": {
                "model_name": f"bench_{dataset}_{backbone}",
                "input_size": {"w": side, "h": side},
                "classes": classes,
                "backbone": backbone,
                "weights": weights,
            },
            "dataset": {
                "ds_root": str(data_root),
                "ds_name": dataset,
                "val_fraction": base["dataset"].get("val_fraction", 0.1),
            },
            "train": train,
        },
        source=f"accuracy benchmark ({dataset}, {backbone})",
        check_flow_module=False,
    )


def budget_callback(budget_s: float, start_cpu: float) -> Any:
    import keras

    class CpuBudget(keras.callbacks.Callback):
        """Stops training once the process has used `budget_s` CPU seconds since start_cpu;
        kept across fit_model's phases (a phase starting over budget stops after one batch)."""

        hit = False

        def _check(self) -> None:
            if time.process_time() - start_cpu >= budget_s:
                CpuBudget.hit = True
                self.model.stop_training = True

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self._check()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._check()

    return CpuBudget()


def serving_floor(
    model_path: Path, uae: Any, bbsd: Any, cfg: Any, work: Path
) -> tuple[float, float, float]:
    """The service's compiled step on the reloaded .keras files: img/s at batch 1 and 32
    (wall), CPU ms per image at batch 32."""
    import keras

    from cvops.model.drift import build_hidden
    from cvops.service.model_store import compile_inference
    from cvops.storage import ModelMetadata

    uae_path, bbsd_path = work / "uae.keras", work / "bbsd.keras"
    uae.save(uae_path)
    bbsd.save(bbsd_path)
    model = keras.models.load_model(model_path, compile=False)
    meta = ModelMetadata(
        **cfg.model.model_dump(mode="json", exclude={"save_dir"}),
        model_path=str(model_path),
        uae_model_path=str(uae_path),
        bbsd_model_path=str(bbsd_path),
        reference_data_path="unused",
    )
    infer = compile_inference(
        model,
        keras.models.load_model(uae_path, compile=False),
        keras.models.load_model(bbsd_path, compile=False),
        meta,
        build_hidden(model, meta.drift_detection.hidden_layer),
    )
    h, w = meta.input_size.h, meta.input_size.w
    rng = np.random.default_rng(0)
    rates = []
    cpu_ms = float("nan")
    for batch in (1, 32):
        x = rng.random((batch, h, w, 3), dtype=np.float32)
        for _ in range(5):
            infer(x)
        calls, t0, c0 = 0, time.perf_counter(), time.process_time()
        while calls < 5 or time.perf_counter() - t0 < 3.0:
            infer(x)
            calls += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rates.append(calls * batch / wall)
        cpu_ms = 1000.0 * cpu / (calls * batch)
    return rates[0], rates[1], cpu_ms


def run_row(
    dataset: str,
    backbone: str,
    weights_tag: str,
    weights: str,
    budget_s: float,
    data_root: Path,
    work: Path,
    max_epochs: int,
) -> Row:
    import keras

    from cvops.model.backbones import nested_backbone
    from cvops.model.evaluate import evaluate, predict
    from cvops.model.train import build_detectors, fit_model, load_splits, split_dataset

    cfg = make_config(dataset, backbone, weights, data_root, max_epochs)
    splits = load_splits(cfg, cfg.dataset.path)
    row = Row(dataset, backbone, weights_tag, budget_s)
    row.n_train, row.n_val, row.n_test = len(splits.train), len(splits.val), len(splits.test)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    budget = budget_callback(budget_s, start_cpu)
    model, history = fit_model(cfg, splits, callbacks=[budget])
    row.cpu_s = time.process_time() - start_cpu
    row.wall_s = time.perf_counter() - start_wall
    row.epochs = len(history.get("loss", []))
    val_losses = history.get("val_loss", [])
    row.best_val_loss = float(min(val_losses)) if val_losses else float("nan")
    if type(budget).hit:
        row.stopped_by = "budget"
    elif row.epochs < max_epochs:
        row.stopped_by = "early stopping"
    else:
        row.stopped_by = "epoch cap"
    row.extra["val_accuracy"] = [round(float(v), 4) for v in history.get("val_accuracy", [])]
    aug, sched, stop = cfg.train.augmentation, cfg.train.lr_schedule, cfg.train.early_stopping
    row.extra["config"] = (
        f"random_hue {aug.random_hue}, lr schedule {sched.kind} (patience {sched.patience}), "
        f"early stopping patience {stop.patience}"
    )

    probs, targets = predict(model, split_dataset(cfg, splits.test, batch_size=128))
    result = evaluate(probs, targets, cfg.model.classes)
    row.accuracy, row.auc = result.accuracy, result.auc_macro_ovr

    work.mkdir(parents=True, exist_ok=True)
    model_path = work / "model.keras"
    model.save(model_path)
    row.params = int(model.count_params())
    row.keras_mb = model_path.stat().st_size / 1e6
    net = nested_backbone(model)
    if net is not None and backbone in PRETRAINED and weights_tag == "none":
        net.save_weights(work / "backbone_notop.weights.h5")  # for the pretrained rows
    uae, bbsd, _ = build_detectors(cfg, model, splits)
    row.serve_b1, row.serve_b32, row.serve_b32_cpu_ms = serving_floor(
        model_path, uae, bbsd, cfg, work
    )
    keras.backend.clear_session()
    return row


def retime_serving(row: Row, work: Path, data_root: Path) -> None:
    """The serving floor of a cached row again, with the current compiled step: from the row's
    saved files, or an untrained model of the same architecture (the compute is the same)."""
    import keras

    from cvops.model.build import build_model
    from cvops.model.drift import build_bbsd, build_uae

    cfg = make_config(row.dataset, row.backbone, "none", data_root, 1)
    saved = work / "models" / row.key.replace(":", "__")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if (saved / "model.keras").is_file():
            model_path = saved / "model.keras"
            uae = keras.models.load_model(saved / "uae.keras", compile=False)
            bbsd = keras.models.load_model(saved / "bbsd.keras", compile=False)
        else:
            side = DATASETS[row.dataset]
            model = build_model((side, side), 10, backbone=row.backbone)
            model_path = scratch / "model.keras"
            model.save(model_path)
            uae, bbsd = build_uae((side, side), 32, seed=cfg.seed), build_bbsd(model)
        row.serve_b1, row.serve_b32, row.serve_b32_cpu_ms = serving_floor(
            model_path, uae, bbsd, cfg, scratch
        )
    row.extra["serving_retimed"] = True
    keras.backend.clear_session()


# --- report ------------------------------------------------------------------------------------


def fmt(value: float, digits: int) -> str:
    return "–" if value != value else f"{value:.{digits}f}"


def weights_label(row: Row) -> str:
    if row.weights == "none":
        return "none (scratch)"
    return "demo-pretrained file"


def table(rows: list[Row], default: str) -> str:
    head = (
        "| dataset | backbone | weights | test acc | macro AUC | budget CPU s | train CPU s "
        "| train wall s | epochs | stopped by | params | .keras MB | serve img/s b1 "
        "| serve img/s b32 | serve CPU ms/img b32 |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        name = f"**{r.backbone}** (default)" if r.backbone == default else r.backbone
        if r.extra.get("code") == BEFORE_PRECISE_BN:
            name += " †"
        if r.dataset == "demo" and "config" not in r.extra:
            name += " ‡"
        lines.append(
            f"| {r.dataset} | {name} | {weights_label(r)} | {fmt(r.accuracy, 3)} "
            f"| {fmt(r.auc, 4)} | {r.budget_cpu_s:.0f} | {fmt(r.cpu_s, 0)} | {fmt(r.wall_s, 0)} "
            f"| {r.epochs} "
            f"| {r.stopped_by} | {r.params:,} | {fmt(r.keras_mb, 2)} | {fmt(r.serve_b1, 0)} "
            f"| {fmt(r.serve_b32, 0)} | {fmt(r.serve_b32_cpu_ms, 2)} |"
        )
    return head + "\n".join(lines) + "\n"


def footnote(rows: list[Row]) -> str:
    notes = ""
    if any(r.dataset == "demo" and "config" not in r.extra for r in rows):
        notes += (
            "\n‡ trained before `train.augmentation.random_hue` (commit 0a438f8) and the schedule "
            "defaults of 7aae02d, at the earlier demo budget (300 CPU s; 150 for the three "
            "largest), not re-run for lack of time; small_cnn went from 0.897 there to 0.985 "
            "here, reference_cnn from 0.885 to 0.853.\n"
        )
    for r in rows:
        if "config" in r.extra:
            notes += f"\n{r.dataset} {r.backbone}: {r.extra['config']}.\n"
    if not any(r.extra.get("code") == BEFORE_PRECISE_BN for r in rows):
        return notes
    return notes + (
        "\n† measured with `fit_model` before precise BatchNorm statistics (commit 35e677d), "
        "not re-run for lack of time; of the rows re-run after it, mobilenet_v3_small gained on "
        "digits (0.972 -> 0.990) and stayed level on the demo (0.888 -> 0.883), small_cnn "
        "stayed level (0.995 -> 0.995, 0.895 -> 0.897).\n"
    )


def environment() -> str:
    import keras
    import sklearn
    import tensorflow as tf

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores seen by the "
        f"process, Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}, scikit-learn {sklearn.__version__}"
    )


def order(rows: dict[str, Row]) -> list[Row]:
    rank = {name: i for i, name in enumerate(BACKBONES)}
    return sorted(
        rows.values(),
        key=lambda r: (list(DATASETS).index(r.dataset), r.weights != "none", rank[r.backbone]),
    )


# --- main ----------------------------------------------------------------------------------------


def planned(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(dataset, backbone, weights tag) in run order: the cheap CNNs first, pretrained last
    (they need the demo rows' backbone files)."""
    first = ("small_cnn", "reference_cnn")
    names = [*first, *[b for b in BACKBONES if b not in first]]
    plan = [(ds, b, "none") for b in names for ds in ("digits", "demo")]
    plan += [("digits", b, "demo-pretrained") for b in PRETRAINED]
    if args.only:
        plan = [p for p in plan if row_key(*p) in set(args.only)]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-digits", type=float, default=600.0, help="CPU seconds")
    parser.add_argument("--budget-demo", type=float, default=600.0, help="CPU seconds")
    parser.add_argument(
        "--heavy-factor", type=float, default=0.5, help=f"budget factor for {', '.join(HEAVY)}"
    )
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument(
        "--only", nargs="*", help="rows as dataset:backbone[:demo-pretrained]; default all"
    )
    parser.add_argument("--fresh", action="store_true", help="retrain the selected rows")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "cvops-bench-accuracy"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/accuracy.md")
    parser.add_argument("--no-report", action="store_true", help="train, write no markdown")
    parser.add_argument(
        "--retime-serving",
        action="store_true",
        help="time the serving floor of every cached row again (after serving code changed)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    work = args.work_dir
    data_root = work / "data"
    write_demo(data_root / "demo")
    write_digits(data_root / "digits")
    rows_dir = work / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)

    budgets = {"demo": args.budget_demo, "digits": args.budget_digits}
    for dataset, backbone, tag in planned(args):
        key = row_key(dataset, backbone, tag)
        cached = rows_dir / f"{key.replace(':', '__')}.json"
        if cached.is_file() and not args.fresh:
            print(f"{key}: cached", flush=True)
            continue
        weights = "none"
        if tag == "demo-pretrained":
            source = work / "models" / row_key("demo", backbone, "none").replace(":", "__")
            weights_file = source / "backbone_notop.weights.h5"
            if not weights_file.is_file():
                print(f"{key}: skipped, run demo:{backbone} first ({weights_file})", flush=True)
                continue
            weights = str(weights_file)
        model_dir = work / "models" / key.replace(":", "__")
        shutil.rmtree(model_dir, ignore_errors=True)
        budget = budgets[dataset] * (args.heavy_factor if backbone in HEAVY else 1.0)
        print(f"{key}: training, budget {budget:.0f} CPU s", flush=True)
        row = run_row(
            dataset,
            backbone,
            tag,
            weights,
            budget,
            data_root,
            model_dir,
            args.max_epochs,
        )
        cached.write_text(json.dumps(asdict(row), indent=1))
        print(
            f"{key}: test acc {row.accuracy:.4f}, AUC {row.auc:.4f}, {row.cpu_s:.0f} CPU s, "
            f"{row.wall_s:.0f} wall s, {row.epochs} epochs ({row.stopped_by}), serve "
            f"{row.serve_b1:.0f}/{row.serve_b32:.0f} img/s",
            flush=True,
        )

    rows = {}
    for path in sorted(rows_dir.glob("*.json")):
        row = Row(**json.loads(path.read_text()))
        if args.retime_serving:
            retime_serving(row, work, data_root)
            path.write_text(json.dumps(asdict(row), indent=1))
            print(f"{row.key}: serve {row.serve_b1:.0f}/{row.serve_b32:.0f} img/s", flush=True)
        rows[row.key] = row
    from cvops.config import ModelConfig

    default = ModelConfig.model_fields["backbone"].default
    print(table(order(rows), default))
    if not args.no_report:
        write_report(args.out, order(rows), default, budgets, args.max_epochs, args.heavy_factor)


def write_report(
    out: Path,
    rows: list[Row],
    default: str,
    budgets: dict[str, float],
    max_epochs: int,
    heavy: float,
) -> None:
    """The table, the setup and the notes; the conclusion lives between markers and is kept
    when the file is rewritten (it is written by hand from the numbers)."""
    marker_start, marker_end = "<!-- conclusion -->", "<!-- /conclusion -->"
    conclusion = "(conclusion: written by hand from the table)"
    if out.is_file():
        text = out.read_text()
        if marker_start in text and marker_end in text:
            conclusion = text.split(marker_start, 1)[1].split(marker_end, 1)[0].strip()
    sizes = {r.dataset: (r.n_train, r.n_val, r.n_test) for r in rows}
    demo, digits = sizes.get("demo", (0, 0, 0)), sizes.get("digits", (0, 0, 0))
    body = f"""# Accuracy per backbone at a fixed CPU-time budget

`make bench-accuracy` (`benchmarks/accuracy.py`), on {environment()}. The default backbone
(`model.backbone` in `cvops.config`) is `{default}`.

{table(rows, default)}{footnote(rows)}
## Setup

- **digits** (real): scikit-learn's `load_digits`, 1,797 8x8 greyscale handwritten digits
  shipped inside the scikit-learn wheel (no download), written as 8x8 PNGs and **upscaled to
  64x64 RGB** by the shared `preprocess_image` (bilinear, antialiased; grey to 3 channels). One
  fixed stratified split (`train_test_split(..., test_size=397, stratify=y, random_state=0)`):
  1,400 train, of which `dataset.val_fraction` 0.1 is validation ({digits[0]} train /
  {digits[1]} val), and {digits[2]} test. **Horizontal flip off** (a mirrored digit is not a
  digit); the other augmentations as in the config (`random_hue` turns no grey pixel).
- **demo** (synthetic): `cvops data demo` (250 train / 60 test images per class, 10 classes,
  seed 0) at the demo config's 50x50: {demo[0]} train / {demo[1]} val / {demo[2]} test.
  Each class has its own hue with exceptions (10% random colours), so colour alone gives about
  0.89; `train.augmentation.random_hue: 0.5` (the shipped configs) makes the network learn the
  shapes.
- **Training**: cvops' own `load_splits` + `fit_model` (backbone build, tf.data pipeline with
  augmentation, early stopping on val_loss with the best weights restored, plateau lr schedule,
  precise BatchNorm statistics before each validation for backbones trained from scratch,
  two-phase fine-tuning for a weights file), with the training section of
  `configs/train_flow.yaml` (Adam, lr 1e-3, batch 64) and `hparams.epochs` raised to
  {max_epochs}, so training ends at the **CPU-time budget** ({budgets["digits"]:.0f} CPU s on
  digits, {budgets["demo"]:.0f} CPU s on demo: on 2 cores that is
  {budgets["digits"] / 120:.0f} and {budgets["demo"] / 120:.0f} minutes of wall time; the three
  largest families, {", ".join(HEAVY)}, get {heavy:.0%} of it to keep the run near an hour, see
  the budget column) or earlier by early stopping. The budget is `time.process_time()` (all
  threads of the process) from the start of `fit_model`, checked after every batch by a
  callback; the batch and the epoch's validation pass in flight finish, so "train CPU s" (input
  pipeline, data decoding and cache fill included) is a little above it. Wall seconds were
  measured under `nice -n 19` on a 2-core machine shared with other work (at times two
  benchmark processes ran at once), so they can be well above CPU s / 2: CPU seconds are the
  comparable measure. Epochs: the number run (a budget-stopped last epoch is partial). Seed 42,
  one run per row.
- **weights**: `none` trains from random initialisation. No ImageNet weights can be downloaded
  here (no network), so the **demo-pretrained file** rows are the transfer-learning path with a
  local weights file made here: the backbone of the demo row's trained model (from scratch,
  300 CPU s on the demo shapes, before `random_hue`: the ‡ models), saved without its top
  (`nested_backbone(model).save_weights(...)`), then `model.weights: <that file>` on digits
  through the normal two-phase path (`train.finetune` defaults: 3 warm-up epochs with the
  backbone frozen, then the top 30 % of its layers at lr x 0.1, BatchNorm frozen). The
  pretraining time is not counted in the row's budget (these rows ran at half the digits
  budget, for lack of time: see the budget column). This is shapes-to-digits transfer, much
  weaker than ImageNet weights would be.
- **Model size**: parameters, and the saved `.keras` file.
- **Serving compute floor**: the service's compiled inference step
  (`cvops.service.model_store.compile_inference`: probabilities + Grad-CAM + UAE + BBSD + hidden
  features in one traced step) on the reloaded `.keras` files, random inputs at the model's input
  size, images/s at batch 1 and batch 32 over >= 3 s after 5 warm-up calls (wall clock, so load
  from other processes lowers it), and CPU ms per image at batch 32 (process CPU time, which
  other processes do not inflate). Decoding, HTTP and recording are not included: this is the
  model's floor, not the service's throughput. The step changed while the rows trained (the
  BBSD output now comes from the Grad-CAM pass), so every row's floor was timed again at the
  end, one row after another with the same code (`--retime-serving`; digits
  mobilenet_v3_large on an untrained model of the same architecture, its file being gone).

## Conclusion

{marker_start}
{conclusion}
{marker_end}
"""
    out.write_text(body)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
