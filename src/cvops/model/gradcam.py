"""Grad-CAM on the last conv feature map, for the predicted class, batched and compiled once.

The feature map is the 4-D tensor the `features` pooling layer reads: the backbone's final
activations whatever the family (a nested keras.applications network, or one whose last
Conv2D is followed by BatchNorm and an activation). Models without that layer fall back to the
last top-level Conv2D.

The gradient model is built once per loaded model (the reference rebuilt it per request) and the
whole step runs in one `tf.function`, ~10x faster than eager GradientTape per image.
"""

from __future__ import annotations

import functools

import cv2
import keras
import numpy as np
import tensorflow as tf

from cvops.model.backbones import cam_source


def last_conv_layer(model: keras.Model) -> keras.layers.Layer:
    """The last top-level Conv2D: the CAM layer of models without a `features` layer."""
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return layer
    raise ValueError(f"model {model.name} has no Conv2D layer for Grad-CAM")


def cam_tensor(model: keras.Model) -> keras.KerasTensor:
    """The feature map Grad-CAM weighs: the 4-D input of `features`, else the last Conv2D's."""
    source = cam_source(model)
    return source if source is not None else last_conv_layer(model).output


def gradient_model(model: keras.Model, extra_outputs: tuple = ()) -> keras.Model:
    """One model giving (last conv activations, class probabilities, *extra_outputs): extra
    layer outputs (the drift monitor's hidden features) come from the same forward pass."""
    return keras.Model(model.input, [cam_tensor(model), model.output, *extra_outputs])


def gradcam(grad_model: keras.Model, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(probabilities (n, classes), heatmaps (n, h', w') in [0, 1]) for the predicted classes."""
    probs, cams, _ = gradcam_and_extras(grad_model, images)
    return probs, cams


def gradcam_and_extras(
    grad_model: keras.Model, images: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
    """`gradcam` plus the grad model's extra outputs.

    Images in a batch are independent, so the gradient of the summed class scores gives every
    image's own gradient in one backward pass.
    """
    with tf.GradientTape() as tape:
        conv, probs, *extras = grad_model(images, training=False)
        predicted = tf.argmax(probs, axis=1, output_type=tf.int32)
        scores = tf.gather(probs, predicted, axis=1, batch_dims=1)
    grads = tape.gradient(scores, conv)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return probs, tf.math.divide_no_nan(cam, peak), extras


def heatmap_to_image(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """Upsample a [0,1] heatmap to the image size, blurred and with weak values cut (0..1)."""
    resized = cv2.resize(
        heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    kernel = max(3, (min(width, height) // 10) | 1)
    blurred = cv2.GaussianBlur(resized, (kernel, kernel), 0)
    blurred[blurred < 0.2 * float(blurred.max() or 1.0)] = 0.0
    return np.clip(blurred, 0.0, 1.0)


@functools.cache
def _jet_lut() -> np.ndarray:
    """OpenCV's JET colours of the 256 levels, (256, 3) BGR; read-only."""
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0]
    lut.setflags(write=False)
    return lut


def colorize_bgr(heatmap: np.ndarray) -> np.ndarray:
    """[0,1] heatmap -> BGR uint8 with the JET colormap (as the reference), OpenCV's order;
    a table lookup (`applyColorMap` rebuilds its table on every call: 5x slower)."""
    return np.take(_jet_lut(), np.uint8(255 * heatmap), axis=0)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """[0,1] heatmap -> RGB uint8 with the JET colormap (as the reference)."""
    return cv2.cvtColor(colorize_bgr(heatmap), cv2.COLOR_BGR2RGB)


def blend(
    image: np.ndarray, heatmap: np.ndarray, coloured: np.ndarray, alpha: float = 0.45
) -> np.ndarray:
    """`coloured` (same channel order as `image`) blended in where the heatmap is non-zero."""
    blended = cv2.addWeighted(image, 1 - alpha, coloured, alpha, 0)
    return cv2.copyTo(blended, (heatmap > 0).view(np.uint8), image.copy())


def overlay(image_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend the coloured heatmap onto the original image where the heatmap is non-zero."""
    return blend(image_rgb, heatmap, colorize(heatmap), alpha)


def peak_location(heatmap: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """(x, y) of the heatmap's maximum on the image as displayed (upsampled, blurred)."""
    shown = heatmap_to_image(heatmap, width, height)
    y, x = np.unravel_index(int(np.argmax(shown)), shown.shape)
    return int(x), int(y)


def localisation_hit_rate(
    heatmaps: list[np.ndarray], sizes: list[tuple[int, int]], boxes: list[tuple[int, int, int, int]]
) -> float:
    """Share of heatmaps peaking inside the object box (x0, y0, x1, y1; x1, y1 exclusive)."""
    hits = 0
    for heatmap, (width, height), (x0, y0, x1, y1) in zip(heatmaps, sizes, boxes, strict=True):
        x, y = peak_location(heatmap, width, height)
        hits += int(x0 <= x < x1 and y0 <= y < y1)
    return hits / len(heatmaps) if heatmaps else float("nan")
