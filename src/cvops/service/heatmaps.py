"""The two Grad-CAM pictures of a prediction (`raw_hm_img`, `overlaid_img`), drawn from the
upload and the step's class-activation map, and drawn again from a spooled record.

Why a record can carry the map instead of the pictures: `/predict` commits its record to the
spool while it draws (the fsync'd commit and the drawing each take about half a millisecond, and
a lone request waited for both one after the other). The record then holds what the drawing
needs (`HEATMAP_KEY`: the map, the PNG level, the sizes the picture was decoded and fitted to),
the request hands the pictures to the flusher in memory, and only a record whose pictures never
arrived (its worker died, or the flusher was quicker) is drawn again here: the same upload, map
and settings give the same bytes.
"""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cvops.model.gradcam import blend, colorize_bgr, heatmap_to_image
from cvops.service.images import fit_within, open_upload, png_base64, read_upload

HEATMAP_KEY = "heatmap"  # spool-only: never a column; removed before the row is written
UNCHECKED_PIXELS = 2**62  # a spooled upload passed the service's size check already


def picture(
    data: bytes, opened: Image.Image, max_pixels: int, keep_side: int, heatmap_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """(picture the heatmaps are drawn on, BGR, at most `heatmap_side`; the upload's RGB
    pixels, decoded reduced to at least `keep_side` for the model input) from one decode."""
    rgb, _ = read_upload(data, max_pixels, keep_side, opened)
    return cv2.cvtColor(fit_within(rgb, heatmap_side), cv2.COLOR_RGB2BGR), rgb


def draw(bgr: np.ndarray, cam: np.ndarray, png_level: int) -> tuple[str, str]:
    """(heatmap, overlay) as base64 PNGs, drawn in OpenCV's channel order end to end."""
    height, width = bgr.shape[:2]
    heat = heatmap_to_image(cam, width, height)
    coloured = colorize_bgr(heat)
    return (
        png_base64(coloured, png_level, bgr=True),
        png_base64(blend(bgr, heat, coloured), png_level, bgr=True),
    )


def deferred(cam: np.ndarray, png_level: int, keep_side: int, heatmap_side: int) -> dict[str, Any]:
    """What a spooled record needs to have its pictures drawn again (JSON: the map's float32
    values are exact as JSON doubles)."""
    return {
        "cam": np.asarray(cam, np.float32).tolist(),
        "png_level": png_level,
        "keep_side": keep_side,
        "heatmap_side": heatmap_side,
    }


def redraw(payload: dict[str, Any]) -> tuple[str, str]:
    """The pictures of a spooled prediction record that carries `HEATMAP_KEY` and its upload."""
    spec = payload[HEATMAP_KEY]
    data = base64.b64decode(payload["input_img"])
    bgr, _ = picture(
        data,
        open_upload(data, UNCHECKED_PIXELS),
        UNCHECKED_PIXELS,
        int(spec["keep_side"]),
        int(spec["heatmap_side"]),
    )
    return draw(bgr, np.asarray(spec["cam"], np.float32), int(spec["png_level"]))
