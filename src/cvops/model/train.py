"""Training as plain functions: splits, fit, detectors and reference data, saving a package."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import pandas as pd
import tensorflow as tf

from cvops.config import FlowConfig
from cvops.data.images import check_classes, index_split, select_classes, stratified_split
from cvops.data.properties import properties_frame
from cvops.model.backbones import set_backbone_trainable, training_phases
from cvops.model.build import build_model, make_optimizer
from cvops.model.callbacks import BatchNormRecalibration, class_weights, training_callbacks
from cvops.model.drift import (
    build_bbsd,
    build_hidden,
    build_uae,
    embed,
    features,
    reference_frame,
)
from cvops.model.pipeline import make_dataset

log = logging.getLogger(__name__)

# training images whose BatchNorm statistics replace the moving averages before validation
BN_RECALIBRATION_IMAGES = 512


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def input_hw(cfg: FlowConfig) -> tuple[int, int]:
    assert cfg.model is not None
    return cfg.model.input_size.h, cfg.model.input_size.w


def load_splits(cfg: FlowConfig, dataset_dir: Path) -> Splits:
    """Index train/test, keep the configured classes, hold out a validation share of train."""
    assert cfg.model is not None and cfg.dataset is not None
    classes = cfg.model.classes
    frames = {}
    for split in ("train", "test"):
        frame = index_split(dataset_dir, split)
        check_classes(frame, classes, f"{dataset_dir} [{split}]")
        frames[split] = select_classes(frame, classes)
    train, val = stratified_split(frames["train"], cfg.dataset.val_fraction, cfg.seed)
    log.info("Images: train %d, val %d, test %d", len(train), len(val), len(frames["test"]))
    return Splits(train=train, val=val, test=frames["test"])


def split_dataset(
    cfg: FlowConfig, frame: pd.DataFrame, *, training: bool = False, batch_size: int | None = None
) -> tf.data.Dataset:
    assert cfg.train is not None or batch_size is not None
    size = batch_size or cfg.train.hparams.batch_size  # type: ignore[union-attr]
    return make_dataset(
        frame["path"].tolist(),
        frame["target"].tolist(),
        input_hw(cfg),
        size,
        shuffle=training,
        augment=cfg.train.augmentation if training and cfg.train else None,
        seed=cfg.seed,
    )


def fit_model(
    cfg: FlowConfig, splits: Splits, callbacks: list[keras.callbacks.Callback] | None = None
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build the configured backbone and train it: one phase from scratch (weights none), or
    warm-up with the backbone frozen then fine-tuning its top at a lower rate (pretrained).

    Each phase is one `model.fit` with the same caller callbacks, epochs counted on across
    phases (`initial_epoch`), so per-epoch metrics form one curve; the histories are joined.
    """
    assert cfg.model is not None and cfg.train is not None
    keras.utils.set_random_seed(cfg.seed)
    hp = cfg.train.hparams
    model = build_model(
        input_hw(cfg),
        len(cfg.model.classes),
        classification_layer=cfg.model.classification_layer,
        activation=cfg.model.classifier_activation,
        backbone=cfg.model.backbone,
        weights=cfg.model.weights,
    )
    val_ds = split_dataset(cfg, splits.val) if len(splits.val) else None
    train_ds = split_dataset(cfg, splits.train, training=True)
    sample = splits.train
    if len(sample) > BN_RECALIBRATION_IMAGES:
        sample = sample.sample(n=BN_RECALIBRATION_IMAGES, random_state=cfg.seed)
    calibration = split_dataset(cfg, sample.reset_index(drop=True))  # unaugmented, cached
    ft = cfg.train.finetune
    phases = training_phases(
        cfg.model.weights, hp.epochs, ft.warmup_epochs, ft.unfreeze_fraction, ft.lr_factor
    )
    history: dict[str, list[float]] = {}
    epoch = 0
    for phase in phases:
        if phase.unfreeze_fraction is not None:
            opened = set_backbone_trainable(model, phase.unfreeze_fraction)
            log.info(
                "Phase %s (epochs %d-%d): %d backbone layers trainable, lr %.2g",
                phase.name,
                epoch + 1,
                phase.until_epoch,
                opened,
                hp.init_lr * phase.lr_factor,
            )
        model.compile(  # again per phase: trainable flags and the rate change
            optimizer=make_optimizer(hp.optimizer, hp.init_lr * phase.lr_factor),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        result = model.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=epoch,
            epochs=phase.until_epoch,
            # ours first: the caller's (MLflow) then see learning_rate and the restored weights
            callbacks=[
                BatchNormRecalibration(calibration, has_validation=val_ds is not None),
                *training_callbacks(cfg, val_ds is not None, epochs=phase.until_epoch - epoch),
                *(callbacks or []),
            ],
            class_weight=class_weights(cfg, splits.train),
            shuffle=False,  # the tf.data pipeline shuffles, seeded
            verbose=2,
        )
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        # early stopping may end a warm-up early: fine-tuning starts then, the total stays
        epoch += len(result.history.get("loss", []))
    return model, history


def build_detectors(
    cfg: FlowConfig, model: keras.Model, splits: Splits
) -> tuple[keras.Model, keras.Model, pd.DataFrame]:
    """UAE + BBSD detectors and reference features of up to n_sample training images."""
    assert cfg.model is not None
    drift = cfg.model.drift_detection
    uae = build_uae(input_hw(cfg), drift.uae_encoding_dims, seed=cfg.seed)
    bbsd = build_bbsd(model, drift.bbsd_layer_idx)
    sample = splits.train
    if len(sample) > drift.reference_data_n_sample:
        sample = sample.sample(n=drift.reference_data_n_sample, random_state=cfg.seed)
    ds = split_dataset(cfg, sample.reset_index(drop=True), batch_size=256)
    uae_feats, bbsd_feats, targets = embed(uae, bbsd, ds)
    hidden = build_hidden(model, drift.hidden_layer)
    hidden_feats = features(hidden, ds) if hidden is not None else None
    props = properties_frame((images.numpy() for images, _ in ds), sample["path"].tolist())
    ref = reference_frame(uae_feats, bbsd_feats, targets, cfg.model.classes, hidden_feats, props)
    log.info("Reference data: %d rows (uae %d-d, bbsd %d-d)", len(ref), *_dims(ref))
    return uae, bbsd, ref


def _dims(ref: pd.DataFrame) -> tuple[int, int]:
    return len(ref["uae_feats"].iloc[0]), len(ref["bbsd_feats"].iloc[0])


def save_package(
    save_dir: Path,
    model_name: str,
    names: dict[str, str],
    model: keras.Model,
    uae: keras.Model,
    bbsd: keras.Model,
    ref: pd.DataFrame,
) -> dict[str, Path]:
    """Save everything to the local save_dir under the same names central storage uses."""
    save_dir.mkdir(parents=True, exist_ok=True)
    files = {key: save_dir / Path(rel).name for key, rel in names.items()}
    model.save(files["model_path"])
    uae.save(files["uae_model_path"])
    bbsd.save(files["bbsd_model_path"])
    ref.to_parquet(files["reference_data_path"], index=False)
    return files
