"""Evaluation: accuracy, macro one-vs-rest AUC, confusion matrix and classification report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.figure import Figure
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

from cvops.data.images import check_classes, index_split, select_classes
from cvops.model.pipeline import make_dataset

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    accuracy: float
    auc_macro_ovr: float
    confusion: np.ndarray
    report: dict[str, dict[str, float]]
    classes: list[str]

    def report_table(self) -> pd.DataFrame:
        rows = [
            {"class": name, **values}
            for name, values in self.report.items()
            if isinstance(values, dict)
        ]
        return pd.DataFrame(rows)


def predict(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    probs, targets = [], []
    for images, batch_targets in dataset:
        probs.append(call(images).numpy())
        targets.append(batch_targets.numpy())
    return np.concatenate(probs), np.concatenate(targets)


def macro_ovr_auc(probs: np.ndarray, targets: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present (AUC is undefined for an absent class)."""
    present = [c for c in range(probs.shape[1]) if 0 < (targets == c).sum() < len(targets)]
    if len(present) < probs.shape[1]:
        log.warning("AUC over %d of %d classes (others absent)", len(present), probs.shape[1])
    if not present:
        return float("nan")
    return float(np.mean([roc_auc_score(targets == c, probs[:, c]) for c in present]))


def evaluate(probs: np.ndarray, targets: np.ndarray, classes: list[str]) -> Evaluation:
    labels = list(range(len(classes)))
    predicted = probs.argmax(axis=1)
    report = classification_report(
        targets, predicted, labels=labels, target_names=classes, output_dict=True, zero_division=0
    )
    return Evaluation(
        accuracy=float((predicted == targets).mean()),
        auc_macro_ovr=macro_ovr_auc(probs, targets),
        confusion=confusion_matrix(targets, predicted, labels=labels),
        report=report,
        classes=classes,
    )


def evaluate_on_split(
    model: keras.Model, dataset_dir: Path, split: str, classes: list[str], size: tuple[int, int]
) -> Evaluation:
    """Score a model on one split of an image-folder dataset (size is (height, width))."""
    frame = index_split(dataset_dir, split)
    check_classes(frame, classes, f"{dataset_dir} [{split}]")
    frame = select_classes(frame, classes)
    ds = make_dataset(frame["path"].tolist(), frame["target"].tolist(), size, 128, cache=False)
    probs, targets = predict(model, ds)
    result = evaluate(probs, targets, classes)
    log.info(
        "Evaluation on %s (%d images): accuracy %.4f, macro OvR AUC %.4f",
        split,
        len(frame),
        result.accuracy,
        result.auc_macro_ovr,
    )
    return result


def confusion_matrix_figure(ev: Evaluation) -> Figure:
    n = len(ev.classes)
    fig = Figure(figsize=(2 + 0.6 * n, 1.5 + 0.6 * n))
    ax = fig.subplots()
    image = ax.imshow(ev.confusion, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n), ev.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), ev.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = ev.confusion.max() / 2 if ev.confusion.size else 0
    for (i, j), count in np.ndenumerate(ev.confusion):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if count > threshold else "black",
            fontsize=8,
        )
    ax.set_title(f"Confusion matrix (accuracy {ev.accuracy:.3f})")
    fig.tight_layout()
    return fig


def classification_report_figure(ev: Evaluation) -> Figure:
    table = ev.report_table().set_index("class")[["precision", "recall", "f1-score"]]
    fig = Figure(figsize=(6, 1.5 + 0.35 * len(table)))
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(3), table.columns)
    ax.set_yticks(range(len(table)), table.index)
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"Classification report (macro OvR AUC {ev.auc_macro_ovr:.3f})")
    fig.tight_layout()
    return fig
