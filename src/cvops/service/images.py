"""Upload checks and decoding: every bad upload becomes a clear 4xx reason, never a crash or a
500, and a legal but huge image costs bounded time and memory."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import tensorflow as tf
from isal import isal_zlib
from PIL import Image, UnidentifiedImageError

from cvops.model.preprocess import decode_image

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"})
TF_DECODABLE = frozenset({"JPEG", "PNG", "BMP", "GIF"})


class BadImage(ValueError):
    """An upload that is not a usable image; `status` is the HTTP status to answer with."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def read_upload(
    data: bytes, max_pixels: int, keep_side: int | None = None, opened: Image.Image | None = None
) -> tuple[np.ndarray, str]:
    """Decode and check an upload: (RGB uint8 pixels, format). Raises BadImage.

    Formats training reads are decoded by training's own `decode_image` (TensorFlow: 16-bit PNG
    keeps the high byte, GIF transparency and JPEG IDCT as in training), so the model input and
    the overlay both come from the pixels training would see; other formats by PIL. An image at
    least twice `keep_side` on its longest side is decoded reduced (JPEG: DCT scaling) and
    box-reduced by an integer factor to a longest side in [keep_side, 2 * keep_side): a legal
    40 Mpx upload then never lives in memory as more than its one 8-bit decode. `opened`: what
    `open_upload` returned for `data` (its header is then not parsed again).
    """
    image = opened if opened is not None else open_upload(data, max_pixels)
    fmt = image.format or "unknown"
    factor = 1 if keep_side is None else max(image.size) // keep_side
    rgb = _tf_decode(data, fmt, factor) if fmt in TF_DECODABLE else None
    if rgb is None:  # not a format training reads, or one of its variants TF cannot decode
        rgb = _pil_decode(image)
    del image
    return (rgb if keep_side is None else _reduce(rgb, keep_side)), fmt


def open_upload(data: bytes, max_pixels: int) -> Image.Image:
    """The upload's header, checked (format, size; nothing decoded yet). Raises BadImage."""
    if not data:
        raise BadImage("empty file: the upload has no bytes")
    return _open_checked(data, max_pixels)[0]


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Open lazily (header only) and refuse unsupported formats and oversized images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("image too large (decompression bomb)", status=413) from None
    except UnidentifiedImageError:
        raise BadImage("not an image: the file could not be identified as an image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"truncated or corrupt image: {err}") from None
    fmt = image.format or "unknown"
    width, height = image.size
    if fmt not in ALLOWED_FORMATS:
        raise BadImage(f"unsupported image format {fmt}", status=415)
    if width < 1 or height < 1:
        raise BadImage("image has no pixels")
    if width * height > max_pixels:
        raise BadImage(f"image too large: {width}x{height} pixels (limit {max_pixels})", status=413)
    return image, fmt


def _tf_decode(data: bytes, fmt: str, factor: int) -> np.ndarray | None:
    """Training's decode (a zero-copy view of the tensor); None where TensorFlow refuses."""
    try:
        if fmt == "JPEG" and factor >= 2:
            ratio = max(r for r in (1, 2, 4, 8) if r <= factor)
            return np.asarray(tf.io.decode_jpeg(data, channels=3, ratio=ratio))
        return np.asarray(decode_image(tf.constant(data)))  # a tensor: the op's fast path
    except tf.errors.OpError:
        return None


def _pil_decode(image: Image.Image) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # palette transparency: dropped, as TF
            image.load()
            return to_rgb8(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"truncated or corrupt image: {err}") from None


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> RGB uint8, scaling high bit depths instead of clipping them (PIL's
    `convert("RGB")` clips 16-bit grey to nearly white): I;16 and I are read as 16-bit and keep
    the high byte, like 16-bit PNGs in TensorFlow; F is taken as [0, 1] when it stays within
    it, else as [0, 255]. Alpha is dropped, as TensorFlow does."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(values + 0.5, 0, 255).astype(np.uint8)
    elif image.mode == "RGB":
        return np.asarray(image)
    else:
        return np.asarray(image.convert("RGB"))
    return np.repeat(grey[..., None], 3, axis=2)


def fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so the longest side is at most `max_side`."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reduce(rgb: np.ndarray, keep_side: int) -> np.ndarray:
    """Box-reduce by the integer factor that leaves the longest side in [keep_side, 2*keep_side)."""
    height, width = rgb.shape[:2]
    factor = max(height, width) // keep_side
    if factor < 2:
        return rgb
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def fit_within(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down (area averaging, aspect kept) to a longest side <= `max_side`."""
    height, width = rgb.shape[:2]
    size = fitted_size(width, height, max_side)
    if size == (width, height):
        return rgb
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def png_base64(image: np.ndarray, level: int = 1, *, bgr: bool = False) -> str:
    """Base64 PNG of an RGB (or, with `bgr`, OpenCV-ordered) uint8 image.

    Written here rather than by OpenCV or PIL: the SUB row filter in one numpy subtraction and
    the deflate stream by ISA-L (`isal`) at levels 1-3 encode a 120x90 heatmap pair in about
    half of OpenCV's time at level 1 with the SUB filter, for files of the same size (zlib's
    level 1 spends most of its time on the overlay's photo noise). Levels 4-9 use zlib (smaller,
    slower); 0 stores."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"PNG encoding takes HxWx3 uint8 images, not {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    rgb = image[..., ::-1] if bgr else image
    flat = rgb.reshape(height, width * 3)
    rows = np.empty((height, width * 3 + 1), np.uint8)
    rows[:, 0] = 1  # SUB: each byte minus the byte of the pixel to its left
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])
    raw = rows.data
    compressed = isal_zlib.compress(raw, level) if 1 <= level <= 3 else zlib.compress(raw, level)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    png = b"".join(
        (PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", compressed), PNG_END)
    )
    return base64.b64encode(png).decode("ascii")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = isal_zlib.crc32(data, isal_zlib.crc32(tag))
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


PNG_END = _png_chunk(b"IEND", b"")
