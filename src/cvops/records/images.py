"""Where a prediction's images live (`CVOPS_SERVICE_STORE_IMAGES`): the service writes them, the
monitor reads them.

- ``db`` (default; the old ``true``): base64 in the `predictions` row, with the heatmaps.
- ``central_storage``: the upload (and its Grad-CAM overlay, when the request returned one) as
  objects in central storage, the row referencing them; the database stays small and the
  monitor still shows the images that explain a drift. Keys::

      images/<model_name>/<yyyy-mm-dd>/<prediction_id>.<ext>          the upload, as sent
      images/<model_name>/<yyyy-mm-dd>/<prediction_id>.overlay.png    the Grad-CAM overlay

  (the date of the prediction, UTC; `<ext>` from the file's signature), referenced by the row's
  ``prediction_json`` as ``image_key`` and ``overlay_key`` (relative to central storage).
- ``none`` (the old ``false``): no image kept; drift reports list their example ids only.

Nothing of this runs on the request path: the request spools its record as with ``db`` (the
image inside it, already durable), and the spool flusher (`cvops.service.recording`) writes the
objects before the row, so a row never references an object that is not there. Keys are
derived from the prediction id, so a batch retried after an outage rewrites the same objects
and the row lands once.
"""

from __future__ import annotations

import base64
import datetime as dt
from enum import StrEnum
from typing import Any

IMAGES_DIR = "images"
IMAGE_KEY, OVERLAY_KEY = "image_key", "overlay_key"
# the boolean values this setting had before it had three
LEGACY_VALUES = {
    "true": "db",
    "1": "db",
    "yes": "db",
    "on": "db",
    "false": "none",
    "0": "none",
    "no": "none",
    "off": "none",
}


class ImageStore(StrEnum):
    DB = "db"
    CENTRAL_STORAGE = "central_storage"
    NONE = "none"

    @classmethod
    def parse(cls, value: Any) -> Any:
        """Accept the old boolean spellings (true/false, 1/0, yes/no, on/off) as db/none."""
        if isinstance(value, bool):
            return cls.DB if value else cls.NONE
        if isinstance(value, str):
            text = value.strip().lower()
            return LEGACY_VALUES.get(text, text)
        return value


class ImageStoreUnavailable(RuntimeError):
    """Central storage did not take a batch's images; the batch stays spooled and is retried
    (like a database outage)."""


def image_extension(data: bytes) -> str:
    """The file type from its signature (no decoding): jpg, png, gif, webp, bmp, tif, or img."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tif"
    return "img"


def image_prefix(model_name: str, created_on: str | dt.datetime, prediction_id: str) -> str:
    """`images/<model_name>/<yyyy-mm-dd>/<prediction_id>` (UTC date of the prediction)."""
    when = dt.datetime.fromisoformat(created_on) if isinstance(created_on, str) else created_on
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return f"{IMAGES_DIR}/{model_name}/{when:%Y-%m-%d}/{prediction_id}"


def stored_objects(payload: dict[str, Any]) -> tuple[dict[str, str], dict[str, bytes]]:
    """A prediction record's image references and the objects to write for them: the upload
    (base64 `input_img`) and the overlay (`overlaid_img`, a PNG) when the record has it."""
    prefix = image_prefix(payload["model_name"], payload["created_on"], str(payload["id"]))
    upload = base64.b64decode(payload["input_img"])
    keys = {IMAGE_KEY: f"{prefix}.{image_extension(upload)}"}
    objects = {keys[IMAGE_KEY]: upload}
    if payload.get("overlaid_img"):
        keys[OVERLAY_KEY] = f"{prefix}.overlay.png"
        objects[keys[OVERLAY_KEY]] = base64.b64decode(payload["overlaid_img"])
    return keys, objects
