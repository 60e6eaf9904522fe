import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cvops.model.preprocess import preprocess_image, resize_and_scale, resize_and_scale_matrices


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_shape_range_dtype(fmt: str) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (97, 143, 3), dtype=np.uint8)
    out = preprocess_image(encode(img, fmt), (50, 40)).numpy()
    assert out.shape == (50, 40, 3)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_constant_image_keeps_its_value() -> None:
    img = np.full((80, 60, 3), (255, 128, 0), dtype=np.uint8)
    out = preprocess_image(encode(img, "PNG"), (50, 50)).numpy()
    np.testing.assert_allclose(out[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], 128 / 255, atol=1e-6)
    np.testing.assert_allclose(out[..., 2], 0.0, atol=1e-6)


def test_grey_and_rgba_become_rgb() -> None:
    grey = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    assert preprocess_image(encode(grey, "PNG"), (32, 32)).shape == (32, 32, 3)
    out = preprocess_image(encode(rgba, "PNG"), (32, 32)).numpy()
    np.testing.assert_allclose(out[..., 0], 200 / 255, atol=1e-6)


def test_same_result_eager_and_in_tf_data() -> None:
    """Serving calls it eagerly, training inside tf.data: both must give the same tensor."""
    img = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    data = encode(img, "JPEG")
    eager = preprocess_image(data, (50, 50)).numpy()
    ds = tf.data.Dataset.from_tensors(tf.constant(data)).map(
        lambda b: preprocess_image(b, (50, 50))
    )
    graph = next(iter(ds)).numpy()
    np.testing.assert_array_equal(eager, graph)


def test_not_an_image_raises() -> None:
    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocess_image(b"this is not an image", (50, 50))


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((90, 120), (50, 50)),  # the usual downscale
        ((37, 501), (50, 50)),  # extreme aspect
        ((20, 30), (50, 60)),  # upscale
        ((50, 50), (50, 50)),  # identity
        ((1, 1), (50, 50)),
        ((1000, 700), (224, 224)),
    ],
)
def test_service_matrices_equal_training_resize(shape: tuple[int, int], size: tuple[int, int]):
    """The service's NumPy form of `resize_and_scale` gives training's numbers."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = resize_and_scale(image, size).numpy()
    got = resize_and_scale_matrices(image, size)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
