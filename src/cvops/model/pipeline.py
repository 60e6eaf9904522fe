"""tf.data input pipeline: read -> shared preprocessing -> cache -> shuffle -> batch -> augment.

Augmentation uses Keras preprocessing layers (maintained with Keras; imgaug breaks on numpy 2),
seeded so that the same seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from cvops.config import AugmentationConfig
from cvops.model.preprocess import preprocess_image

AUTOTUNE = tf.data.AUTOTUNE


class RandomHueRotation(keras.layers.Layer):
    """Rotates the hue of a random share of the images by a uniform random angle.

    Why: where colour correlates with the class without defining it (the demo's shapes: each
    class has its own hue, with exceptions), a network latches onto colour within two epochs
    and the shape signal comes only from the exceptions; at 0.5 it must learn shape for half the
    images and still uses colour where it holds (demo 0.89 -> 0.985 at the same CPU budget,
    benchmarks/results/accuracy.md). Keras' RandomHue has no per-image probability.
    """

    def __init__(self, share: float, seed: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.share = share
        self.generator = tf.random.Generator.from_seed(seed)

    def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        if not training:
            return images
        n = tf.shape(images)[0]
        hsv = tf.image.rgb_to_hsv(images)
        shift = self.generator.uniform([n, 1, 1])
        rotate = tf.cast(self.generator.uniform([n, 1, 1]) < self.share, images.dtype)
        hue = tf.math.floormod(hsv[..., 0] + shift * rotate, 1.0)
        rotated = tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))
        # untouched images pass through bit-exact (the HSV round trip is not)
        return tf.where(rotate[..., None] > 0, rotated, images)


def build_augmenter(cfg: AugmentationConfig, seed: int) -> keras.Sequential | None:
    """Brightness, flips, rotation and scale (the reference's), plus optional vertical flip and
    random hue.

    Flips are configurable because they change some classes: a mirrored "b" is a "d".
    """
    if not cfg.enabled:
        return None
    steps: list[keras.layers.Layer] = []
    if cfg.brightness > 0:
        steps.append(
            keras.layers.RandomBrightness(cfg.brightness, value_range=(0.0, 1.0), seed=seed)
        )
    flips = [
        axis
        for axis, on in (("horizontal", cfg.horizontal_flip), ("vertical", cfg.vertical_flip))
        if on
    ]
    if flips:  # one layer, RandomFlip's mode names: horizontal, vertical, horizontal_and_vertical
        steps.append(keras.layers.RandomFlip("_and_".join(flips), seed=seed + 1))
    if cfg.rotation > 0:
        steps.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 2))
    if cfg.zoom > 0:
        steps.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="reflect", seed=seed + 3))
    if cfg.random_hue > 0:
        steps.append(RandomHueRotation(cfg.random_hue, seed=seed + 4))
    return keras.Sequential(steps, name="augment") if steps else None


def make_dataset(
    paths: Sequence[str],
    targets: Sequence[int],
    size: tuple[int, int],
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: AugmentationConfig | None = None,
    seed: int = 0,
    cache: bool = True,
) -> tf.data.Dataset:
    """Batches of (images float32 [0,1], int targets); `size` is (height, width)."""
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(paths), tf.string), tf.constant(list(targets), tf.int32))
    )
    ds = ds.map(
        lambda path, target: (preprocess_image(tf.io.read_file(path), size), target),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(max(1, len(paths)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    augmenter = build_augmenter(augment, seed) if augment is not None else None
    if augmenter is not None:
        # Sequential on purpose: the layers' seed state advances per call, so parallel calls
        # would make batches depend on thread timing. Batched ops keep it cheap.
        ds = ds.map(lambda images, target: (augmenter(images, training=True), target))
    return ds.prefetch(AUTOTUNE)
