"""Upload checks: every bad upload becomes a clear 4xx reason, never a crash or a 500."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"})
TF_DECODABLE = frozenset({"JPEG", "PNG", "BMP", "GIF"})


class BadImage(ValueError):
    """An upload that is not a usable image; `status` is the HTTP status to answer with."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def read_upload(data: bytes, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode and check an upload: (RGB uint8 image, format). Raises BadImage."""
    if not data:
        raise BadImage("empty file: the upload has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            width, height = image.size
            if fmt not in ALLOWED_FORMATS:
                raise BadImage(f"unsupported image format {fmt}", status=415)
            if width < 1 or height < 1:
                raise BadImage("image has no pixels")
            if width * height > max_pixels:
                raise BadImage(
                    f"image too large: {width}x{height} pixels (limit {max_pixels})", status=413
                )
            image.load()
            rgb = np.asarray(image.convert("RGB"))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("image too large (decompression bomb)", status=413) from None
    except UnidentifiedImageError:
        raise BadImage("not an image: the file could not be identified as an image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"truncated or corrupt image: {err}") from None
    return rgb, fmt


def png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
