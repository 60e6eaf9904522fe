"""Per-image analysis, run in worker processes: one small record per file, never the pixels.

Why a separate module: it is what the worker processes import, so it stays light (Pillow,
numpy, OpenCV, imagehash; no pydantic, pandas or the report code) and it must never raise on a
bad file: every failure becomes a record with ``ok=False`` and a reason naming the problem.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Decode big JPEGs at a reduced scale (Pillow's draft mode): features need ~512 px, not 24 MP.
ANALYSIS_SIDE = 512
# Thumbnails that confirm a perceptual-hash near-duplicate candidate: 16x16 colour (layout and
# colour) + 32x32 grey (its gradients tell stripes from dots from plain), 1792 bytes per image.
COLOUR_SIDE = 16
GREY_SIDE = 32
COLOUR_SIZE = COLOUR_SIDE * COLOUR_SIDE * 3
SIGNATURE_SIZE = COLOUR_SIZE + GREY_SIDE * GREY_SIDE
# Image properties compared between splits, in report order.
PROPERTIES: tuple[str, ...] = (
    "width",
    "height",
    "aspect",
    "brightness",
    "contrast",
    "sharpness",
    "saturation",
    "mean_r",
    "mean_g",
    "mean_b",
)


@dataclass(slots=True)
class ImageRecord:
    """What the checks need of one file (~1 KB, whatever the image size)."""

    path: str
    ok: bool
    error: str = ""
    file_bytes: int = 0
    file_hash: str = ""
    pixel_hash: str = ""
    mode: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    aspect: float = float("nan")
    brightness: float = float("nan")
    contrast: float = float("nan")
    sharpness: float = float("nan")
    saturation: float = float("nan")
    mean_r: float = float("nan")
    mean_g: float = float("nan")
    mean_b: float = float("nan")
    phash: int = 0
    signature: bytes = b""


def init_worker() -> None:
    """One OpenCV thread per worker process: the pool already uses the cores."""
    cv2.setNumThreads(1)


def _hash64(h: imagehash.ImageHash) -> int:
    return int.from_bytes(np.packbits(h.hash.ravel()).tobytes(), "big")


def _describe_error(err: BaseException, data: bytes) -> str:
    text = str(err) or type(err).__name__
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    if isinstance(err, Image.UnidentifiedImageError):
        head = data[:64]
        text_like = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
        return f"cannot identify image file ({'text' if text_like else 'unknown format'})"
    return f"unreadable image ({type(err).__name__}: {text})"


def analyse_image(path: str) -> ImageRecord:
    """Decode one file and measure it; any failure is returned as ``ok=False`` with a reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return ImageRecord(path=path, ok=False, error=f"cannot read file ({err.strerror or err})")
    rec = ImageRecord(path=path, ok=False, file_bytes=len(data))
    if not data:
        rec.error = "empty file (0 bytes)"
        return rec
    rec.file_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency, ...
            with Image.open(io.BytesIO(data)) as im:
                rec.mode, rec.format = im.mode, im.format or ""
                rec.width, rec.height = im.size
                if im.format == "JPEG" and max(im.size) > 2 * ANALYSIS_SIDE:
                    im.draft("RGB", (ANALYSIS_SIDE, ANALYSIS_SIDE))
                im.load()
                rgb = im.convert("RGB") if im.mode != "RGB" else im.copy()
    except Exception as err:  # noqa: BLE001 - any decoder failure is a finding, not a crash
        rec.error = _describe_error(err, data)
        return rec
    try:
        _measure(rec, rgb)
    except Exception as err:  # noqa: BLE001
        rec.error = f"cannot analyse decoded image ({type(err).__name__}: {err})"
        return rec
    rec.ok = True
    return rec


def _measure(rec: ImageRecord, rgb: Image.Image) -> None:
    if max(rgb.size) > ANALYSIS_SIDE:
        rgb.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb)
    digest = hashlib.blake2b(str(arr.shape).encode(), digest_size=16)
    digest.update(arr.tobytes())
    rec.pixel_hash = digest.hexdigest()
    rec.aspect = rec.width / rec.height
    for name, value in pixel_properties(arr).items():
        setattr(rec, name, value)
    rec.phash = _hash64(imagehash.phash(rgb))
    colour = rgb.resize((COLOUR_SIDE, COLOUR_SIDE), Image.Resampling.BILINEAR)
    grey32 = rgb.convert("L").resize((GREY_SIDE, GREY_SIDE), Image.Resampling.BILINEAR)
    rec.signature = colour.tobytes() + grey32.tobytes()


def pixel_properties(arr: np.ndarray, grey: np.ndarray | None = None) -> dict[str, float]:
    """Brightness, contrast, sharpness, saturation and mean R/G/B of an RGB uint8 image.

    The one definition of these properties: data validation compares splits with it and the
    drift monitor compares live traffic with the reference data (`cvops.data.properties`).
    OpenCV reductions: several times faster than numpy's on small uint8 images."""
    if grey is None:
        grey = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    mean, std = cv2.meanStdDev(grey)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    mean_r, mean_g, mean_b = (float(v) for v in cv2.mean(arr)[:3])
    return {
        "brightness": float(mean[0, 0]),
        "contrast": float(std[0, 0]),
        "sharpness": float(lap_std[0, 0]) ** 2,
        "saturation": float(cv2.mean(cv2.cvtColor(arr, cv2.COLOR_RGB2HSV))[1]),
        "mean_r": mean_r,
        "mean_g": mean_g,
        "mean_b": mean_b,
    }


# Immerkaer's mask: the difference of two Laplacians, which cancels image structure up to
# second order and leaves mostly noise.
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def noise_level(grey: np.ndarray) -> float:
    """Standard deviation of additive noise in grey levels (J. Immerkaer, "Fast Noise Variance
    Estimation", CVIU 1996): sqrt(pi / 2) / 6 times the mean |mask response| over the interior.
    Blur lowers it, sensor or compression noise raises it; one filter pass, no edge detection."""
    if min(grey.shape[:2]) < 3:
        return 0.0
    response = cv2.filter2D(grey, cv2.CV_32F, _NOISE_MASK)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) / 6 * cv2.mean(np.abs(response))[0])


def thumbnail(path: str, side: int = 96) -> Image.Image | None:
    """A small RGB preview for the report, or None when the file cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.draft("RGB", (side, side))
                rgb = im.convert("RGB")
    except Exception:  # noqa: BLE001 - the report shows a placeholder instead
        return None
    if max(rgb.size) < side // 2:  # tiny images: enlarge so they are visible at all
        scale = max(1, (side // 2) // max(rgb.size))
        return rgb.resize((rgb.width * scale, rgb.height * scale), Image.Resampling.NEAREST)
    rgb.thumbnail((side, side), Image.Resampling.BILINEAR)
    return rgb
