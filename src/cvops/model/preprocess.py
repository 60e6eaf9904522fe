"""The one preprocessing function shared by training (tf.data) and serving.

decode -> resize (bilinear, antialiased) -> scale to [0, 1]. Training and the model service
both call `preprocess_image`, so there is no train/serve skew by construction.
"""

from __future__ import annotations

import tensorflow as tf


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decode JPEG/PNG/BMP/GIF bytes to uint8 HxWx3 (first frame of animations)."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_and_scale(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """uint8 HxWx3 -> float32 (h, w, 3) in [0, 1]; `size` is (height, width)."""
    resized = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def preprocess_image(image_bytes: tf.Tensor | bytes, size: tuple[int, int]) -> tf.Tensor:
    """Encoded image bytes -> model input (h, w, 3) float32 in [0, 1]."""
    return resize_and_scale(decode_image(image_bytes), size)
