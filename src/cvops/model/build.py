"""The reference CNN, exactly as the reference project builds it."""

from __future__ import annotations

import keras
from keras import layers

LAST_CONV_LAYER = "last_conv"
FEATURES_LAYER = "features"  # pooled conv features: the drift monitor's "hidden" embedding


def build_model(
    input_size: tuple[int, int],
    n_classes: int,
    *,
    classification_layer: str = "classify_head",
    activation: str = "softmax",
) -> keras.Model:
    """Input(h, w, 3) -> Conv128 -> MaxPool -> Conv128 -> Conv64 -> GAP -> 64 -> 32 -> classes.

    `input_size` is (height, width). The last conv layer is named so Grad-CAM can find it, the
    pooling layer so the drift monitor can embed with it.
    """
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
