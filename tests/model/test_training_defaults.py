"""Training defaults: early stopping, learning-rate schedules, class weights, flips (issue 13)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from cvops.config import AugmentationConfig, FlowConfig, parse_config
from cvops.model.callbacks import (
    OUTCOME_KEYS,
    BatchNormRecalibration,
    BestEpochStopping,
    class_weights,
    training_callbacks,
)
from cvops.model.pipeline import build_augmenter

CLASSES = ["a", "b", "c"]


def make_cfg(train: dict[str, Any] | None = None, epochs: int = 6, lr: float = 0.05) -> FlowConfig:
    return parse_config(
        {
            "flow_module": "cvops.flows.train_flow",
            "seed": 0,
            "model": {"model_name": "t", "input_size": {"w": 16, "h": 16}, "classes": CLASSES},
            "dataset": {"ds_root": "unused", "ds_name": "unused"},
            "train": {
                "hparams": {"epochs": epochs, "batch_size": 8, "init_lr": lr},
                "mlflow": {"exp_name": "training-defaults-test"},
                **(train or {}),
            },
        },
        check_flow_module=False,
    )


def tiny_model(lr: float) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    return model


def separable(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(n, 4)).astype("float32")
    return x, np.argmax(x[:, :3], axis=1).astype("int32")


class Recorder(keras.callbacks.Callback):
    """Weights after every epoch and the logs of on_train_end (after the callbacks under test)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []
        self.end_logs: dict[str, Any] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.weights.append([w.copy() for w in self.model.get_weights()])

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.end_logs = dict(logs or {})


def test_defaults_apply_to_a_reference_config() -> None:
    train = make_cfg().train
    assert train.early_stopping.enabled and train.early_stopping.patience == 8
    assert train.lr_schedule.patience == 4
    assert train.lr_schedule.kind == "plateau"
    assert train.class_weight == "none"
    assert train.augmentation.horizontal_flip and not train.augmentation.vertical_flip


def test_early_stopping_stops_and_restores_best_weights() -> None:
    # validation labels are the training labels shifted: the better the fit, the worse val_loss
    x, y = separable()
    cfg = make_cfg({"early_stopping": {"patience": 2}, "lr_schedule": {"kind": "none"}}, epochs=20)
    model, recorder = tiny_model(0.05), Recorder()
    callbacks = training_callbacks(cfg, has_validation=True)
    assert any(isinstance(c, BestEpochStopping) for c in callbacks)
    history = model.fit(
        x,
        y,
        validation_data=(x, (y + 1) % 3),
        epochs=20,
        callbacks=[*callbacks, recorder],
        verbose=0,
    ).history
    val_loss = history["val_loss"]
    best = int(np.argmin(val_loss))
    assert len(val_loss) < 20, "stopped early"
    assert len(val_loss) == best + 1 + 2, "patience 2 after the best epoch"
    assert best != len(val_loss) - 1
    for restored, at_best in zip(model.get_weights(), recorder.weights[best], strict=True):
        np.testing.assert_array_equal(restored, at_best)
    assert model.evaluate(x, (y + 1) % 3, verbose=0) == pytest.approx(min(val_loss), rel=1e-5)
    assert recorder.end_logs["early_stopping_best_epoch"] == best + 1
    assert recorder.end_logs["early_stopping_stopped_epoch"] == len(val_loss)
    assert recorder.end_logs["early_stopping_best_val_loss"] == pytest.approx(min(val_loss))


def test_without_validation_early_stopping_is_off_and_plateau_watches_loss(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cvops.model.callbacks"):
        callbacks = training_callbacks(make_cfg(), has_validation=False)
    assert not any(isinstance(c, keras.callbacks.EarlyStopping) for c in callbacks)
    (plateau,) = [c for c in callbacks if isinstance(c, keras.callbacks.ReduceLROnPlateau)]
    assert plateau.monitor == "loss"
    assert "Early stopping off: no validation split" in caplog.text
    disabled = make_cfg({"early_stopping": {"enabled": False}})
    assert not any(
        isinstance(c, keras.callbacks.EarlyStopping) for c in training_callbacks(disabled, True)
    )


def test_plateau_reduces_the_learning_rate_to_its_floor() -> None:
    # min_delta 10: no epoch after the first counts as an improvement, so from the second on
    # every epoch (patience 1) ends by halving the rate, down to min_lr; the logged rate is
    # the one the epoch trained with
    x, y = separable()
    plateau = {"kind": "plateau", "factor": 0.5, "patience": 1, "min_delta": 10.0}
    schedule = {**plateau, "min_lr": 0.004}
    cfg = make_cfg({"early_stopping": {"enabled": False}, "lr_schedule": schedule}, epochs=6)
    model = tiny_model(0.05)
    history = model.fit(
        x, y, validation_data=(x, y), epochs=6, callbacks=training_callbacks(cfg, True), verbose=0
    ).history
    lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    assert lr == pytest.approx(0.004)
    assert history["learning_rate"] == pytest.approx([0.05, 0.05, 0.025, 0.0125, 0.00625, 0.004])


def test_cosine_decays_over_each_phase_after_warmup() -> None:
    x, y = separable()
    schedule = {"kind": "cosine", "warmup_epochs": 1, "min_lr": 0.0}
    cfg = make_cfg({"early_stopping": {"enabled": False}, "lr_schedule": schedule}, epochs=5)
    model = tiny_model(0.04)
    lrs = model.fit(x, y, epochs=5, callbacks=training_callbacks(cfg, False), verbose=0).history[
        "learning_rate"
    ]
    assert lrs[0] == pytest.approx(0.02)  # warm-up: half way to init_lr
    assert lrs[1] == pytest.approx(0.04)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False)), lrs
    assert lrs[-1] < 0.01
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == lrs[-1]
    # a second phase (fresh callbacks, fit continuing at epoch 5) runs its own curve
    model.optimizer.learning_rate = 0.01
    again = model.fit(
        x,
        y,
        initial_epoch=5,
        epochs=8,
        callbacks=training_callbacks(cfg, False, epochs=3),
        verbose=0,
    ).history["learning_rate"]
    assert again[0] == pytest.approx(0.005) and again[1] == pytest.approx(0.01)
    assert again[2] < again[1]


def test_learning_rate_is_in_every_epochs_logs_without_a_schedule() -> None:
    x, y = separable()
    cfg = make_cfg({"lr_schedule": {"kind": "none"}}, epochs=3)
    history = (
        tiny_model(0.03)
        .fit(x, y, epochs=3, callbacks=training_callbacks(cfg, False), verbose=0)
        .history
    )
    assert history["learning_rate"] == pytest.approx([0.03] * 3)


def test_class_weights_balanced_named_and_none() -> None:
    frame = pd.DataFrame({"target": [0] * 6 + [1] * 3 + [2]})
    balanced = class_weights(make_cfg({"class_weight": "balanced"}), frame)
    assert balanced == pytest.approx({0: 10 / 18, 1: 10 / 9, 2: 10 / 3})
    # every class together carries the same weight
    assert {k: w * (frame["target"] == k).sum() for k, w in balanced.items()} == pytest.approx(
        {0: 10 / 3, 1: 10 / 3, 2: 10 / 3}
    )
    named = class_weights(make_cfg({"class_weight": {"b": 2.5}}), frame)
    assert named == {0: 1.0, 1: 2.5, 2: 1.0}
    assert class_weights(make_cfg(), frame) is None


@pytest.mark.parametrize(
    ("train", "field"),
    [
        ({"early_stopping": {"patience": -1}}, "train.early_stopping.patience"),
        ({"early_stopping": {"patiense": 3}}, "train.early_stopping.patiense"),
        ({"lr_schedule": {"kind": "step"}}, "train.lr_schedule.kind"),
        ({"lr_schedule": {"factor": 1.5}}, "train.lr_schedule.factor"),
        ({"lr_schedule": {"warmup_epochs": -2}}, "train.lr_schedule.warmup_epochs"),
        ({"class_weight": "balance"}, "train.class_weight"),
        ({"class_weight": {"a": -1}}, "train.class_weight"),
        ({"class_weight": {"zebra": 2.0}}, "train.class_weight"),
        ({"augmentation": {"vertical_flip": "sometimes"}}, "train.augmentation.vertical_flip"),
    ],
)
def test_bad_training_field_is_named(train: dict[str, Any], field: str) -> None:
    from cvops.config import ConfigError

    with pytest.raises(ConfigError) as err:
        make_cfg(train)
    assert f"{field}:" in str(err.value)


def test_vertical_flip_option_flips_up_down_only() -> None:
    off = {"brightness": 0.0, "rotation": 0.0, "zoom": 0.0, "horizontal_flip": False}
    assert build_augmenter(AugmentationConfig(**off), 0) is None
    augmenter = build_augmenter(AugmentationConfig(**off, vertical_flip=True), 0)
    assert augmenter is not None
    images = np.random.default_rng(0).random((32, 8, 8, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(augmenter(images, training=True))
    flipped = [np.array_equal(o, i[::-1]) for o, i in zip(out, images, strict=True)]
    same = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 0 < sum(flipped) < 32
    both = build_augmenter(AugmentationConfig(**{**off, "horizontal_flip": True}), 0)
    assert both is not None and both.layers[0].mode == "horizontal"


def bn_model(momentum: float = 0.99) -> tuple[keras.Model, keras.layers.Layer, keras.layers.Layer]:
    """input -> BatchNorm (trainable, first: its statistics are the input's) -> frozen
    BatchNorm -> Dense(3)."""
    inputs = keras.Input((4,))
    trained = keras.layers.BatchNormalization(momentum=momentum, name="trained")
    frozen = keras.layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    outputs = keras.layers.Dense(3, activation="softmax")(frozen(trained(inputs)))
    return keras.Model(inputs, outputs), trained, frozen


def calibration_data() -> tuple[np.ndarray, tf.data.Dataset]:
    x = np.random.default_rng(4).normal(3.0, 2.0, size=(64, 4)).astype("float32")
    return x, tf.data.Dataset.from_tensor_slices((x, np.zeros(64, "int32"))).batch(16)


def test_batchnorm_recalibration_sets_the_mean_of_the_batch_statistics() -> None:
    x, dataset = calibration_data()
    model, trained, frozen = bn_model()
    callback = BatchNormRecalibration(dataset, has_validation=True)
    callback.set_model(model)
    assert callback.recalibrate() == 1
    batches = x.reshape(4, 16, 4)
    np.testing.assert_allclose(trained.moving_mean.numpy(), batches.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(trained.moving_variance.numpy(), batches.var(1).mean(0), rtol=1e-4)
    assert trained.momentum == 0.99  # restored
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), np.zeros(4))  # untouched
    np.testing.assert_array_equal(frozen.moving_variance.numpy(), np.ones(4))


@pytest.mark.parametrize("has_validation", [True, False])
def test_batchnorm_recalibration_runs_before_validation_or_at_the_end(has_validation) -> None:
    """After a short fit the moving statistics are the calibration data's, not the lagging
    averages (momentum 0.99: still near their initial 0 and 1 after 8 steps)."""
    x, dataset = calibration_data()
    y = np.random.default_rng(5).integers(0, 3, 64)
    model, trained, _ = bn_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    seen: list[np.ndarray] = []

    class Probe(keras.callbacks.Callback):
        def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
            seen.append(trained.moving_mean.numpy().copy())

    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        validation_data=(x, y) if has_validation else None,
        callbacks=[BatchNormRecalibration(dataset, has_validation=has_validation), Probe()],
        verbose=0,
    )
    expected = x.reshape(4, 16, 4).mean(1).mean(0)
    np.testing.assert_allclose(trained.moving_mean.numpy(), expected, rtol=1e-5)
    assert len(seen) == (2 if has_validation else 0)
    for mean in seen:  # every validation pass saw the recalibrated statistics
        np.testing.assert_allclose(mean, expected, rtol=1e-5)


@pytest.fixture()
def image_splits(tmp_path: Path):
    """An imbalanced 3-class set of 16x16 PNGs (class = dominant colour channel)."""
    from PIL import Image

    from cvops.model.train import Splits

    rng = np.random.default_rng(0)
    rows = []
    for target, count in enumerate((12, 4, 2)):
        for i in range(count):
            pixels = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
            pixels[..., target] += 160
            path = tmp_path / f"{target}_{i}.png"
            Image.fromarray(pixels).save(path)
            rows.append((str(path), CLASSES[target], target))
    frame = pd.DataFrame(rows, columns=["path", "label", "target"])
    return Splits(train=frame, val=frame.iloc[::3].reset_index(drop=True), test=frame)


def test_class_weights_reach_fit_and_change_the_loss(image_splits, monkeypatch) -> None:
    from cvops.model.train import fit_model

    seen: list[Any] = []
    original = keras.Model.fit

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    common = {"augmentation": {"enabled": False}}
    _, plain = fit_model(make_cfg(common, epochs=1, lr=0.001), image_splits)
    _, weighted = fit_model(
        make_cfg({**common, "class_weight": "balanced"}, epochs=1, lr=0.001), image_splits
    )
    assert seen == [None, pytest.approx({0: 0.5, 1: 1.5, 2: 3.0})]
    assert weighted["loss"][0] != pytest.approx(plain["loss"][0], rel=1e-3)


def test_mlflow_gets_learning_rate_per_epoch_and_early_stopping_outcome(
    image_splits, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cvops.flows.train_flow import train_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        run_id = (
            mlflow.MlflowClient()
            .create_run(mlflow.create_experiment("training-defaults"))
            .info.run_id
        )
        train_model.fn(make_cfg(epochs=3, lr=0.001), image_splits, run_id)
        client = MlflowClient()
        lr = client.get_metric_history(run_id, "learning_rate")
        assert sorted(m.step for m in lr) == [0, 1, 2]
        metrics = client.get_run(run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)
    assert set(OUTCOME_KEYS) <= set(metrics)
    assert 1 <= metrics["early_stopping_best_epoch"] <= 3
    assert metrics["epochs_run"] == 3


def test_random_hue_rotates_a_share_of_images_and_keeps_shape() -> None:
    off = {"brightness": 0.0, "rotation": 0.0, "zoom": 0.0, "horizontal_flip": False}
    augmenter = build_augmenter(AugmentationConfig(**off, random_hue=0.5), 0)
    assert augmenter is not None
    rng = np.random.default_rng(0)
    images = rng.random((200, 8, 8, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(augmenter(images, training=True))
    same = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert 0.35 < same.mean() < 0.65  # about half untouched, bit-exact
    hsv_in = tf.image.rgb_to_hsv(images[~same]).numpy()
    hsv_out = tf.image.rgb_to_hsv(out[~same]).numpy()
    # the others keep saturation and value pixel for pixel; only the hue turns
    np.testing.assert_allclose(hsv_out[..., 1:], hsv_in[..., 1:], atol=1e-4)
    turned = (hsv_out[..., 0] - hsv_in[..., 0]) % 1.0
    assert np.ptp(np.median(turned.reshape(len(turned), -1), axis=1)) > 0.5  # random angles
    again = build_augmenter(AugmentationConfig(**off, random_hue=0.5), 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(images, training=True)), out)
    grey = np.repeat(images[..., :1], 3, axis=-1)  # no hue to turn: greyscale stays grey
    np.testing.assert_allclose(keras.ops.convert_to_numpy(augmenter(grey)), grey, atol=1e-6)
