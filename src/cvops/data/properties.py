"""Image properties of what the model sees, for explaining drift: one vector per image.

Why this representation: live uploads and reference images must be measured the same way, or
a property "drifts" because of how it was measured. Both sides already pass through training's
resize to the model input (`cvops.model.preprocess`), so the properties are measured on that
input (area-reduced to at most :data:`PROPERTY_MAX_SIDE` px, which keeps the cost at ~50 us
per image for any input size), plus the original width and height read from the file header.
The pixel properties come from :func:`cvops.data.validation.features.pixel_properties`, the
data validation's own definitions, and :func:`~cvops.data.validation.features.noise_level`.

Reference data store them as ``prop_<name>`` columns; the service stores them per prediction
(``predictions.image_props``) off the request path (see ``cvops.service.recording``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from cvops.data.validation.features import PROPERTIES, noise_level, pixel_properties

log = logging.getLogger(__name__)

# Report order. width/height/aspect: the original image; the rest: the model input.
IMAGE_PROPERTIES: tuple[str, ...] = (*PROPERTIES, "noise")  # data validation's, plus noise
PROPERTY_MAX_SIDE = 64
REFERENCE_PREFIX = "prop_"


def as_uint8(x: np.ndarray) -> np.ndarray:
    """A model input (float [0, 1], HxWx3) as uint8 RGB, area-reduced to at most
    PROPERTY_MAX_SIDE px on its longest side."""
    x = np.asarray(x, dtype=np.float32)
    height, width = x.shape[:2]
    scale = PROPERTY_MAX_SIDE / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        x = cv2.resize(x, size, interpolation=cv2.INTER_AREA)
    return cv2.convertScaleAbs(x, alpha=255.0)  # rounds and saturates to [0, 255]


def input_properties(x: np.ndarray, width: int, height: int) -> dict[str, float]:
    """Properties of one model input `x` whose original image is `width` x `height` px."""
    arr = as_uint8(x)
    grey = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    props = {
        "width": float(width),
        "height": float(height),
        "aspect": float(width) / float(height) if height else float("nan"),
    }
    props.update(pixel_properties(arr, grey))
    props["noise"] = noise_level(grey)
    return props


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header; (0, 0) when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.size
    except Exception:  # noqa: BLE001 - an unreadable file has no size, not an error here
        return 0, 0


def properties_frame(batches: Iterable[np.ndarray], paths: Sequence[str | Path]) -> pd.DataFrame:
    """Properties of model-input batches (N x H x W x 3, float [0, 1]) in the order of
    `paths`, the files they were read from: one ``prop_<name>`` column per property."""
    sizes = [image_size(p) for p in paths]
    rows: list[dict[str, float]] = []
    for batch in batches:
        for x in np.asarray(batch):
            width, height = sizes[len(rows)]
            rows.append(input_properties(x, width, height))
    if len(rows) != len(sizes):
        raise ValueError(f"{len(rows)} images for {len(sizes)} paths")
    frame = pd.DataFrame(rows, columns=list(IMAGE_PROPERTIES))
    unreadable = frame["width"] == 0
    frame.loc[unreadable, ["width", "height", "aspect"]] = np.nan
    return frame.add_prefix(REFERENCE_PREFIX)


def reference_properties(columns: Iterable[str]) -> list[str]:
    """The property names whose ``prop_<name>`` column a reference table has."""
    present = set(columns)
    return [p for p in IMAGE_PROPERTIES if f"{REFERENCE_PREFIX}{p}" in present]
