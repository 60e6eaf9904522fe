"""Drift detectors built at the end of training, and the reference data the monitor compares to.

UAE: an untrained (randomly initialised, seeded) conv encoder -> 32-d embedding, as in the
reference (Rabanser et al., "Failing Loudly"). BBSD: the classifier's own softmax output
(black-box shift detection). The reference loaded BBSD from the UAE path; here each detector
has its own file and the metadata names both.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import layers

log = logging.getLogger(__name__)


def build_uae(input_size: tuple[int, int], encoding_dims: int = 32, seed: int = 0) -> keras.Model:
    """Conv 64/128/512 (stride 2) -> Flatten -> Dense(encoding_dims), seeded initialisation."""
    h, w = input_size

    def init(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=seed + offset)

    inputs = keras.Input(shape=(h, w, 3), name="image")
    x = inputs
    for i, filters in enumerate((64, 128, 512)):
        x = layers.Conv2D(
            filters, 4, strides=2, padding="same", activation="relu", kernel_initializer=init(i)
        )(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(encoding_dims, kernel_initializer=init(3), name="uae_encoding")(x)
    return keras.Model(inputs, outputs, name="uae")


def build_bbsd(model: keras.Model, layer_idx: int = -1) -> keras.Model:
    """Features of layer `layer_idx` of the trained classifier (-1: its softmax output)."""
    return keras.Model(model.input, model.layers[layer_idx].output, name="bbsd")


def build_hidden(model: keras.Model, layer: str | None) -> keras.Model | None:
    """The classifier's own features at `layer`, or None when off or the model has no such
    layer (a model built before the layer was named): the monitor then skips the embedding."""
    if not layer:
        return None
    try:
        output = model.get_layer(layer).output
    except ValueError:
        log.warning("Model %s has no layer %r: no hidden-layer drift features", model.name, layer)
        return None
    return keras.Model(model.input, output, name="hidden")


def features(detector: keras.Model, dataset: tf.data.Dataset) -> np.ndarray:
    """One detector's features for every batch of an (unaugmented) dataset."""
    step = tf.function(lambda x: detector(x, training=False), reduce_retracing=True)
    return np.concatenate([step(images).numpy() for images, _ in dataset])


def embed(
    uae: keras.Model, bbsd: keras.Model, dataset: tf.data.Dataset
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UAE features, BBSD features and targets for every batch of an (unaugmented) dataset."""
    uae_fn = tf.function(lambda x: uae(x, training=False), reduce_retracing=True)
    bbsd_fn = tf.function(lambda x: bbsd(x, training=False), reduce_retracing=True)
    uae_parts, bbsd_parts, target_parts = [], [], []
    for images, targets in dataset:
        uae_parts.append(uae_fn(images).numpy())
        bbsd_parts.append(bbsd_fn(images).numpy())
        target_parts.append(targets.numpy())
    return np.concatenate(uae_parts), np.concatenate(bbsd_parts), np.concatenate(target_parts)


def reference_frame(
    uae_feats: np.ndarray,
    bbsd_feats: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    hidden_feats: np.ndarray | None = None,
    properties: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Columns `uae_feats`, `bbsd_feats` (lists of floats), `label` (class name), when the
    model has a hidden-feature layer `hidden_feats`, and the images' `prop_<name>` columns
    (`cvops.data.properties`) when given."""
    columns = {
        "uae_feats": [row.astype("float32").tolist() for row in uae_feats],
        "bbsd_feats": [row.astype("float32").tolist() for row in bbsd_feats],
        "label": [classes[int(t)] for t in targets],
    }
    if hidden_feats is not None:
        columns["hidden_feats"] = [row.astype("float32").tolist() for row in hidden_feats]
    frame = pd.DataFrame(columns)
    if properties is not None:
        frame = pd.concat([frame, properties.reset_index(drop=True)], axis=1)
    return frame
