"""How training is driven: early stopping, the learning-rate schedule and class weights.

`training_callbacks` builds a fresh list for one `model.fit` call, so a run trained in phases
(frozen backbone, then fine-tuning) gives each phase its own early stopping and its own cosine
curve over that phase's epochs. Every epoch's logs carry `learning_rate` (the rate that epoch
trained with), so the MLflow callback placed after these logs it beside the losses.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import keras
import pandas as pd
import tensorflow as tf

from cvops.config import FlowConfig

log = logging.getLogger(__name__)

# Keys BestEpochStopping adds to the logs of on_train_end, for callbacks after it (MLflow).
OUTCOME_KEYS = (
    "early_stopping_best_epoch",
    "early_stopping_stopped_epoch",
    "early_stopping_best_val_loss",
)


def current_lr(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class CosineSchedule(keras.callbacks.Callback):
    """Per-epoch cosine decay from the optimizer's rate at the start of fit to `min_lr`.

    The first `warmup_epochs` rise linearly towards that rate (a fresh head's large gradients
    would otherwise wreck pretrained features). Epochs count from this fit's first epoch, so a
    later phase's `fit(initial_epoch=k)` runs its own curve over its own `epochs`.
    """

    def __init__(self, epochs: int, *, warmup_epochs: int = 0, min_lr: float = 0.0) -> None:
        super().__init__()
        self.epochs = max(1, epochs)
        self.warmup_epochs = min(warmup_epochs, self.epochs - 1)
        if self.warmup_epochs < warmup_epochs:
            log.warning(
                "Cosine warm-up cut to %d epochs: the phase has only %d", self.warmup_epochs, epochs
            )
        self.min_lr = min_lr
        self.base_lr = 0.0
        self._first_epoch: int | None = None

    def lr_at(self, step: int) -> float:
        """The rate of the `step`-th epoch of this fit (0-based)."""
        if step < self.warmup_epochs:
            return self.base_lr * (step + 1) / (self.warmup_epochs + 1)
        done = min(1.0, (step - self.warmup_epochs) / (self.epochs - self.warmup_epochs))
        floor = min(self.min_lr, self.base_lr)
        return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * done))

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.base_lr = current_lr(self.model)
        self._first_epoch = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._first_epoch is None:
            self._first_epoch = epoch
        self.model.optimizer.learning_rate = self.lr_at(epoch - self._first_epoch)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = current_lr(self.model)


class LearningRateLog(keras.callbacks.Callback):
    """Puts the epoch's rate into its logs when no schedule did (kind: none)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs.setdefault("learning_rate", current_lr(self.model))


class BestEpochStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping (best weights restored) that also says what it did.

    One log line, and the outcome in the logs of on_train_end for the callbacks after it:
    `early_stopping_best_epoch` (1-based, as Keras prints epochs; MLflow's step is one less),
    `early_stopping_stopped_epoch` (1-based; 0 when all epochs ran) and
    `early_stopping_best_val_loss` (the monitored value of the restored weights).
    """

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_end(logs)
        if self.best is None:  # no epoch ran or the monitor never appeared
            return
        outcome = {
            "early_stopping_best_epoch": self.best_epoch + 1,
            "early_stopping_stopped_epoch": self.stopped_epoch + 1 if self.stopped_epoch else 0,
            "early_stopping_best_val_loss": float(self.best),
        }
        if self.stopped_epoch:
            log.info(
                "Early stopping after epoch %d: %s did not improve for %d epochs; weights of "
                "epoch %d restored (%s %.4f)",
                self.stopped_epoch + 1,
                self.monitor,
                self.patience,
                self.best_epoch + 1,
                self.monitor,
                self.best,
            )
        else:
            log.info(
                "Weights of the best epoch %d restored (%s %.4f)",
                self.best_epoch + 1,
                self.monitor,
                self.best,
            )
        if logs is not None:
            logs.update(outcome)


class BatchNormRecalibration(keras.callbacks.Callback):
    """Exact BatchNorm statistics before every validation pass ("precise BN").

    A BatchNorm layer trained from scratch normalises with each batch's statistics while
    training but with its moving averages in inference mode (validation, evaluation, serving).
    Those averages lag weights that change fast early in training: small_cnn at 0.9 training
    accuracy validated at chance for its first ~60 steps (a walkthrough-sized run never got
    past it, and early stopping kept such an epoch). Before each validation pass, and at the
    end of a fit without validation, this sets the moving mean and variance of every
    trainable BatchNorm layer to the plain average of the batch statistics of `dataset` (a
    fixed, unaugmented sample of the training split) under the current weights. Frozen
    BatchNorm layers (a pretrained backbone) are left alone; without any trainable one it does
    nothing.
    """

    def __init__(self, dataset: tf.data.Dataset, *, has_validation: bool) -> None:
        super().__init__()
        self.dataset = dataset
        self.has_validation = has_validation

    def recalibrate(self) -> int:
        """Re-estimate the statistics; returns the number of BatchNorm layers updated."""
        layers = [
            layer
            for layer in _walk(self.model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        ]
        if not layers:
            return 0
        momenta = [layer.momentum for layer in layers]
        try:
            for k, (images, _) in enumerate(self.dataset, start=1):
                for layer in layers:  # moving <- (moving * (k - 1) + batch) / k: the mean
                    layer.momentum = (k - 1) / k
                self.model(images, training=True)
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum
        return len(layers)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.recalibrate()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self.has_validation:
            self.recalibrate()


def _walk(model: keras.Model) -> list[keras.layers.Layer]:
    out: list[keras.layers.Layer] = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_walk(layer))
    return out


def training_callbacks(
    cfg: FlowConfig, has_validation: bool, *, epochs: int | None = None
) -> list[keras.callbacks.Callback]:
    """Fresh callbacks for one `model.fit` call of `epochs` (default train.hparams.epochs).

    Early stopping needs a validation split: without one it is off (said in the log), as the
    training loss keeps falling while a model overfits. The plateau schedule then watches the
    training loss, which does say when optimisation stalls.
    """
    assert cfg.train is not None
    train = cfg.train
    epochs = epochs or train.hparams.epochs
    callbacks: list[keras.callbacks.Callback] = []
    schedule = train.lr_schedule
    if schedule.kind == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss" if has_validation else "loss",
                factor=schedule.factor,
                patience=schedule.patience,
                min_delta=schedule.min_delta,
                min_lr=schedule.min_lr,
            )
        )
    elif schedule.kind == "cosine":
        callbacks.append(
            CosineSchedule(epochs, warmup_epochs=schedule.warmup_epochs, min_lr=schedule.min_lr)
        )
    stopping = train.early_stopping
    if stopping.enabled and has_validation:
        callbacks.append(
            BestEpochStopping(
                monitor="val_loss",
                patience=stopping.patience,
                min_delta=stopping.min_delta,
                restore_best_weights=True,
            )
        )
    elif stopping.enabled:
        log.info(
            "Early stopping off: no validation split (dataset.val_fraction: 0), so all %d "
            "epochs run and the last weights are kept",
            epochs,
        )
    callbacks.append(LearningRateLog())
    return callbacks


def class_weights(cfg: FlowConfig, train_frame: pd.DataFrame) -> dict[int, float] | None:
    """Loss weight per class index for `model.fit(class_weight=...)`; None: unweighted.

    `balanced` is n / (k * count) over the training split (scikit-learn's formula): every class
    then carries the same total weight, so a rare class is not traded away for accuracy on the
    common ones. Every class index gets a weight (1.0 when unnamed or without images), as
    Keras looks weights up in a table as long as the largest index it is given.
    """
    assert cfg.train is not None and cfg.model is not None
    spec = cfg.train.class_weight
    classes = cfg.model.classes
    if spec == "none":
        return None
    if spec == "balanced":
        counts = train_frame["target"].value_counts()
        n, k = int(counts.sum()), int((counts > 0).sum())
        weights = {
            i: n / (k * int(counts[i])) if counts.get(i, 0) > 0 else 1.0
            for i in range(len(classes))
        }
    else:
        unknown = sorted(set(spec) - set(classes))
        if unknown:
            raise ValueError(f"train.class_weight: classes {unknown} are not in model.classes")
        weights = {i: float(spec.get(name, 1.0)) for i, name in enumerate(classes)}
    log.info("Class weights: %s", {classes[i]: round(w, 4) for i, w in weights.items()})
    return weights
