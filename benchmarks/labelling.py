"""Does labelling what the strategies pick pay? The labelling loop simulated with an oracle.

Question (issue 17 item 5): after a shift, is accuracy on the shifted images higher when the
100 / 200 / 400 labels of `cvops label push` come from an uncertainty strategy or the
drift-weighted one than from random picks?

Setup, built once under ``--work``:
- the demo dataset (all 10 classes, ``--train-per-class`` training and ``--test-per-class``
  test images) and small_cnn trained on it through cvops' own training code (`fit_model`, the
  shipped config's augmentation), once;
- shifted production traffic: `cvops.data.shift` on the test split, ``background/high`` (every
  object re-rendered on a background style never seen in training; classes unchanged) and
  ``unseen_class/medium`` (30% of the images replaced by shapes of no known class);
- per image: the model's softmax and its pooled conv features (`features`, the monitor's
  `hidden` embedding); the training images' features (the reference, and the head's data).

Per scenario x seed, the shifted images are split at random into a pool (2/3, what push
chooses from) and a test half (1/3). Each strategy selects ``b`` pool images in one push
(`cvops.labelling.select.select`, the product's function, random control share 10%;
drift_weighted with `DriftTester.window_scores` of the pool's hidden features against the
reference, as push does); the oracle labels them with their true class; "other / unknown"
images (unseen shapes) are kept out of the training data, as pull does by default.
"Retraining" is a multinomial logistic-regression head on the frozen conv features, fit on the
training images + the labelled pool images: a cheap proxy (54 full CNN trainings do not fit
the budget) that measures how informative the labels are, not end-to-end fine-tuning gains.
Accuracy is on the test half's known-class images; for unseen_class the share of labels spent
on unseen shapes (thrown away) is reported too.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/labelling.py --work /tmp/labelling
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from cvops.labelling.select import select  # noqa: E402
from cvops.monitor.stats import DriftTester  # noqa: E402

log = logging.getLogger("labelling_benchmark")
SCENARIOS = ("background/high", "unseen_class/medium")
STRATEGIES = ("random", "least_confidence", "margin", "entropy", "drift_weighted")
BUDGETS = (100, 200, 400)
SIZE = (50, 50)
UNKNOWN = -1


def prepare(args: argparse.Namespace) -> Path:
    """Dataset, trained model, scenarios and per-image features, cached in one .npz."""
    work = Path(args.work)
    cache = work / "features.npz"
    if cache.exists():
        return cache
    import yaml

    from cvops.config import parse_config
    from cvops.data.demo import CLASSES, generate_demo_dataset
    from cvops.data.shift import generate_shift_scenarios
    from cvops.model.drift import build_hidden, features
    from cvops.model.pipeline import make_dataset
    from cvops.model.train import fit_model, load_splits

    data = work / "data"
    if not (data / "annotations.csv").exists():
        generate_demo_dataset(
            data,
            n_train_per_class=args.train_per_class,
            n_test_per_class=args.test_per_class,
            seed=0,
        )
    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs/full_flow.yaml").read_text())
    cfg = parse_config(
        {
            "flow_module": "cvops.flows.train_flow",
            "seed": 0,
            "model": {"model_name": "labelling_bench", "input_size": {"w": SIZE[1], "h": SIZE[0]},
                      "classes": list(CLASSES)},
            "dataset": {"ds_root": str(work), "ds_name": "data", "val_fraction": 0.1},
            "train": {
                "hparams": {"epochs": args.epochs, "batch_size": 64, "init_lr": 0.001},
                "augmentation": shipped["train"]["augmentation"],
                "mlflow": {"exp_name": "unused"},
            },
        }
    )  # fmt: skip
    splits = load_splits(cfg, data)
    t0 = time.perf_counter()
    model, history = fit_model(cfg, splits)
    train_s = time.perf_counter() - t0
    log.info("trained in %.0f s, val accuracy %s", train_s, history.get("val_accuracy", [None])[-1])
    scen = work / "scenarios"
    if not (scen / "manifest.csv").exists():
        generate_shift_scenarios(
            data / "test",
            scen,
            scenarios=("background", "unseen_class"),
            severities=("medium", "high"),
            annotations=data / "annotations.csv",
        )
    hidden = build_hidden(model, cfg.model.drift_detection.hidden_layer)
    assert hidden is not None
    index = {c: i for i, c in enumerate(CLASSES)}

    def embed(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ds = make_dataset(paths, [0] * len(paths), SIZE, 256, cache=False)
        probs = np.concatenate([model(x, training=False).numpy() for x, _ in ds])
        return probs, features(hidden, ds)

    arrays: dict[str, np.ndarray] = {}
    train = pd.concat([splits.train, splits.val])
    arrays["train/probs"], arrays["train/hidden"] = embed(train["path"].tolist())
    arrays["train/target"] = train["target"].to_numpy()
    test = splits.test
    arrays["clean/probs"], arrays["clean/hidden"] = embed(test["path"].tolist())
    arrays["clean/target"] = test["target"].to_numpy()
    manifest = pd.read_csv(scen / "manifest.csv")
    for name in SCENARIOS:
        scenario, severity = name.split("/")
        rows = manifest[(manifest["scenario"] == scenario) & (manifest["severity"] == severity)]
        paths = [str(scen / p) for p in rows["path"]]
        arrays[f"{name}/probs"], arrays[f"{name}/hidden"] = embed(paths)
        arrays[f"{name}/target"] = np.asarray(
            [index.get(Path(p).parent.name, UNKNOWN) for p in rows["path"]]
        )
    arrays["train_seconds"] = np.asarray(train_s)
    np.savez_compressed(cache, **arrays)
    return cache


def head_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    scaler = StandardScaler().fit(x_train)
    head = LogisticRegression(C=0.5, max_iter=2000)
    head.fit(scaler.transform(x_train), y_train)
    return float((head.predict(scaler.transform(x_test)) == y_test).mean())


def simulate(cache: Path, seeds: int) -> pd.DataFrame:
    a = dict(np.load(cache))
    x_tr, y_tr = a["train/hidden"], a["train/target"]
    rows = []
    for scenario in SCENARIOS:
        probs, hidden, target = (
            a[f"{scenario}/probs"],
            a[f"{scenario}/hidden"],
            a[f"{scenario}/target"],
        )
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(target))
            cut = 2 * len(order) // 3
            pool, test = order[:cut], order[cut:]
            known = test[target[test] != UNKNOWN]
            cnn = float((probs[known].argmax(1) == target[known]).mean())
            base = head_accuracy(x_tr, y_tr, hidden[known], target[known])
            rows.append(dict(scenario=scenario, seed=seed, strategy="(no labels, CNN)", budget=0,
                             accuracy=cnn, unknown_share=np.nan))  # fmt: skip
            rows.append(dict(scenario=scenario, seed=seed, strategy="(no labels, head)", budget=0,
                             accuracy=base, unknown_share=np.nan))  # fmt: skip
            scores = DriftTester(x_tr, ("classifier",), seed=seed).window_scores(hidden[pool])
            for strategy in STRATEGIES:
                for budget in BUDGETS:
                    sel = select(
                        probs[pool],
                        budget,
                        strategy,
                        random_share=0.1,
                        domain_scores=scores if strategy == "drift_weighted" else None,
                        seed=seed,
                    )
                    picked = pool[sel.indices]
                    labelled = picked[target[picked] != UNKNOWN]
                    acc = head_accuracy(
                        np.vstack([x_tr, hidden[labelled]]),
                        np.concatenate([y_tr, target[labelled]]),
                        hidden[known],
                        target[known],
                    )
                    rows.append(dict(scenario=scenario, seed=seed, strategy=strategy,
                                     budget=budget, accuracy=acc,
                                     unknown_share=1 - len(labelled) / len(picked)))  # fmt: skip
            log.info("%s seed %d done", scenario, seed)
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame, cache: Path, seeds: int, elapsed: float) -> str:
    a = np.load(cache)
    lines = [
        "# Labelling strategies vs random (issue 17 item 5)",
        "",
        " ".join(
            f"""`benchmarks/labelling.py`: the labelling loop simulated with an oracle labeller.
            small_cnn trained once on the demo (10 classes, {len(a["train/target"])} training
            images, {float(a["train_seconds"]):.0f} s), shifted traffic from `cvops.data.shift`,
            split per seed into a pool (2/3, what `label push` picks from) and a test third. One
            push of b labels per strategy (`cvops.labelling.select.select`, its 10% random
            control share included; drift_weighted with the domain classifier's
            `window_scores` on the hidden features); unseen shapes labelled `other / unknown`
            are kept out, as `label pull` does. Retraining = a logistic-regression head on the
            frozen conv features, trained on the training images + the labelled ones (a proxy
            for the full flow, which would train 54 CNNs). Accuracy on the test third's
            known-class images, mean ± sd over {seeds} seeds (pool/test split, random draws,
            domain-classifier folds).""".split()
        ),
        "",
    ]
    for scenario, part in frame.groupby("scenario", sort=False):
        pool = int(round(len(a[f"{scenario}/target"]) * 2 / 3))
        lines += [f"## {scenario} (pool {pool} images)", ""]
        header = "| strategy | " + " | ".join(f"{b} labels" for b in BUDGETS) + " |"
        lines += [header, "|---|" + "---|" * len(BUDGETS)]
        for name in ("(no labels, CNN)", "(no labels, head)"):
            row = part[part["strategy"] == name]["accuracy"]
            value = f"{row.mean():.3f} ± {row.std(ddof=0):.3f}"
            lines.append(f"| {name} | {value} | | |")
        for strategy in STRATEGIES:
            cells = []
            for budget in BUDGETS:
                sub = part[(part["strategy"] == strategy) & (part["budget"] == budget)]
                cell = f"{sub['accuracy'].mean():.3f} ± {sub['accuracy'].std(ddof=0):.3f}"
                if scenario.startswith("unseen"):
                    cell += f" ({sub['unknown_share'].mean():.0%} unknown)"
                cells.append(cell)
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Run time {elapsed:.0f} s (features cached in `--work`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/cvops-labelling-bench")
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "labelling.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    cache = prepare(args)
    frame = simulate(cache, args.seeds)
    frame.to_csv(Path(args.work) / "labelling.csv", index=False)
    text = report(frame, cache, args.seeds, time.perf_counter() - started)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
