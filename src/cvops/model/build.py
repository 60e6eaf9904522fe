"""The classifier: the reference CNN, exactly as the reference project builds it, or another
backbone from `cvops.model.backbones` (`model.backbone`)."""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from cvops.model.backbones import FEATURES_LAYER, build_backbone_model

LAST_CONV_LAYER = "last_conv"
__all__ = ["FEATURES_LAYER", "LAST_CONV_LAYER", "build_model", "make_optimizer"]


def build_model(
    input_size: tuple[int, int],
    n_classes: int,
    *,
    classification_layer: str = "classify_head",
    activation: str = "softmax",
    backbone: str = "reference_cnn",
    weights: str | Path | None = "none",
) -> keras.Model:
    """Input(h, w, 3) -> Conv128 -> MaxPool -> Conv128 -> Conv64 -> GAP -> 64 -> 32 -> classes.

    `input_size` is (height, width). The last conv layer is named so Grad-CAM can find it, the
    pooling layer so the drift monitor can embed with it. Another `backbone` (with its
    `weights`) is built by `cvops.model.backbones`, with the same `features` layer and head name.
    """
    if backbone != "reference_cnn":
        return build_backbone_model(
            backbone,
            input_size,
            n_classes,
            weights=weights,
            classification_layer=classification_layer,
            activation=activation,
        )
    if weights not in (None, "none"):
        raise ValueError("reference_cnn trains from scratch: weights must be none")
    h, w = input_size
    inputs = keras.Input(shape=(h, w, 3), name="image")
    x = layers.Conv2D(128, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 3, activation="relu")(x)
    x = layers.Conv2D(64, 3, activation="relu", name=LAST_CONV_LAYER)(x)
    x = layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dense(32, activation="relu")(x)
    outputs = layers.Dense(n_classes, activation=activation, name=classification_layer)(x)
    return keras.Model(inputs, outputs, name="cvops_cnn")


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    optimizers = {
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }
    return optimizers[name](learning_rate=learning_rate)
