"""Upload decoding: the pixels the service decodes are the pixels training decodes, in every
image mode, and large images are decoded reduced."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cvops.model.preprocess import preprocess_image, resize_and_scale
from cvops.service.images import png_base64, read_upload

LIMIT = 40_000_000
SIZE = (50, 40)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def cv2_png(pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return buf.tobytes()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (48, 64), dtype=np.uint16)
RGBA16 = RNG.integers(0, 65536, (48, 64, 4), dtype=np.uint16)
PALETTE = Image.fromarray(RGB).quantize(64)

# Every format training can read (tf.io.decode_image), in the modes that differ between decoders.
TRAINABLE = {
    "png-rgb": encode(Image.fromarray(RGB), "PNG"),
    "png-rgba": encode(Image.fromarray(np.dstack([RGB, RGB[..., 0]])), "PNG"),
    "png-l": encode(Image.fromarray(RGB[..., 0]), "PNG"),
    "png-la": encode(Image.fromarray(RGB[..., :2], "LA"), "PNG"),
    "png-p": encode(PALETTE, "PNG"),
    "png-p-transparency": encode(PALETTE, "PNG", transparency=3),
    "png-1bit": encode(Image.fromarray(RGB[..., 0] > 128), "PNG"),
    "png-grey16": cv2_png(GREY16),
    "png-rgb16": cv2_png(RGBA16[..., :3]),
    "png-rgba16": cv2_png(RGBA16),
    "bmp": encode(Image.fromarray(RGB), "BMP"),
    "gif": encode(PALETTE, "GIF"),
    "gif-transparency": encode(PALETTE, "GIF", transparency=3),
    "jpeg": encode(Image.fromarray(RGB), "JPEG", quality=90),
    "jpeg-grey": encode(Image.fromarray(RGB[..., 0]), "JPEG", quality=90),
    "jpeg-cmyk": encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=90),
}


@pytest.mark.parametrize("name", list(TRAINABLE))
def test_served_pixels_are_the_training_pixels(name: str) -> None:
    """Train/serve parity: the service's model input, and the pixels its overlay is drawn on, are
    exactly what training's `preprocess_image` makes of the same bytes."""
    data = TRAINABLE[name]
    rgb, _ = read_upload(data, LIMIT)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    trained = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    np.testing.assert_array_equal(rgb, trained)
    np.testing.assert_array_equal(
        resize_and_scale(rgb, SIZE).numpy(), preprocess_image(data, SIZE).numpy()
    )


def grey_levels() -> np.ndarray:
    return np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16x64, every 4th level


OTHER_MODES = {
    "tiff-I;16": ("TIFF", "I;16", lambda g: Image.fromarray(g.astype(np.uint16) * 257)),
    "tiff-I": ("TIFF", "I", lambda g: Image.fromarray(g.astype(np.int32) * 257)),
    "tiff-F-unit": ("TIFF", "F", lambda g: Image.fromarray(g.astype(np.float32) / 255)),
    "tiff-F-255": ("TIFF", "F", lambda g: Image.fromarray(g.astype(np.float32))),
    "tiff-LA": ("TIFF", "LA", lambda g: Image.fromarray(np.dstack([g, g]), "LA")),
    "tiff-CMYK": ("TIFF", "CMYK", lambda g: Image.fromarray(np.dstack([g] * 3)).convert("CMYK")),
    "tiff-P": ("TIFF", "P", lambda g: Image.fromarray(g).convert("P")),
    "webp-RGBA": ("WEBP", "RGBA", lambda g: Image.fromarray(np.dstack([g] * 4))),
    "webp-LA": ("WEBP", "RGBA", lambda g: Image.fromarray(np.dstack([g, g]), "LA")),
}


@pytest.mark.parametrize("name", list(OTHER_MODES))
def test_other_modes_decode_to_their_8_bit_picture(name: str) -> None:
    """Formats training cannot read (PIL decodes them): high-bit-depth modes are scaled to 8 bits,
    not clipped, and every mode becomes the same grey picture."""
    fmt, mode, make = OTHER_MODES[name]
    grey = grey_levels()
    data = encode(make(grey), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).mode == mode
    rgb, decoded_fmt = read_upload(data, LIMIT)
    assert decoded_fmt == fmt and rgb.dtype == np.uint8 and rgb.shape == (16, 64, 3)
    tolerance = 8 if mode == "CMYK" else 1
    assert np.abs(rgb.astype(int) - grey[..., None]).max() <= tolerance


def test_large_jpeg_is_decoded_reduced() -> None:
    """A 4000x3000 JPEG is decoded at 1/2 scale (DCT scaling, never the full 36 MB) and still
    shows the same picture as the full decode."""
    ramp = np.linspace(0, 255, 4000, dtype=np.float32).astype(np.uint8)
    pixels = np.dstack([np.tile(ramp, (3000, 1))] * 3)
    pixels[1000:2000, 1000:3000] = (200, 30, 30)
    data = encode(Image.fromarray(pixels), "JPEG", quality=90)
    rgb, _ = read_upload(data, LIMIT, keep_side=1024)
    assert rgb.shape == (1500, 2000, 3)
    reduced = tf.io.decode_jpeg(data, channels=3, ratio=2).numpy()
    np.testing.assert_array_equal(rgb, reduced)
    full = cv2.resize(pixels, (2000, 1500), interpolation=cv2.INTER_AREA)
    assert np.abs(rgb.astype(int) - full).mean() < 2


def test_large_png_is_reduced_and_its_model_input_stays_close() -> None:
    """Above 2x keep_side an image is box-reduced by an integer factor before the shared resize;
    the model input differs from training's full-resolution path only by rounding."""
    y, x = np.mgrid[0:2100, 0:2600]
    pixels = np.dstack([x * 255 // 2600, y * 255 // 2100, (x + y) % 256]).astype(np.uint8)
    pixels[600:1400, 700:1900] = (250, 250, 20)
    data = encode(Image.fromarray(pixels), "PNG")
    rgb, _ = read_upload(data, LIMIT, keep_side=1024)
    assert rgb.shape == (1050, 1300, 3)  # factor 2
    served = resize_and_scale(rgb, SIZE).numpy()
    trained = preprocess_image(data, SIZE).numpy()
    assert np.abs(served - trained).max() < 0.01  # measured 0.0003 (and 0.005 at 224x224)
    assert np.abs(served - trained).mean() < 0.001
    small, _ = read_upload(encode(Image.fromarray(pixels[:1500, :2000]), "PNG"), LIMIT, 1024)
    assert small.shape == (1500, 2000, 3)  # under 2x keep_side: full resolution, exact parity


@pytest.mark.parametrize("level", [0, 1, 3, 6])
@pytest.mark.parametrize("shape", [(90, 120), (1, 1), (7, 300)])
def test_heatmap_png_decodes_to_the_exact_pixels(level: int, shape: tuple[int, int]) -> None:
    """Our own PNG writer (ISA-L deflate, SUB filter): every decoder reads back the exact
    pixels in the right channel order, at every compression level."""
    rng = np.random.default_rng(level)
    smooth = cv2.resize(rng.random((4, 4, 3)).astype(np.float32), shape[::-1]) * 255
    noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    for bgr in (True, False):
        encoded = base64.b64decode(png_base64(noisy, level, bgr=bgr))
        with Image.open(io.BytesIO(encoded)) as decoded:
            assert decoded.format == "PNG" and decoded.mode == "RGB"
            pil_rgb = np.asarray(decoded)
        cv_bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
        expected_rgb = noisy[..., ::-1] if bgr else noisy
        np.testing.assert_array_equal(pil_rgb, expected_rgb)
        np.testing.assert_array_equal(cv_bgr[..., ::-1], expected_rgb)


def test_png_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="uint8"):
        png_base64(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        png_base64(np.zeros((4, 4, 3), np.float32))
