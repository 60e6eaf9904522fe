"""Large and 16-bit uploads through POST /predict (issue 12): a legal 36 Mpx image costs bounded
time and memory, and the overlay shows the pixels the model saw."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from PIL import Image

from cvops.model.preprocess import decode_image
from cvops.service.app import create_app
from cvops.service.settings import ServiceSettings
from tests.service.conftest import image_bytes

MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's RSS in a thread: `growth` is the peak over the starting value."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def gradient_png(width: int, height: int) -> bytes:
    """A smooth RGB gradient: compresses to ~120 KB at 6000x6000 (a legal, cheap upload)."""
    ramp_x = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
    ramp_y = np.linspace(0, 255, height, dtype=np.float32).astype(np.uint8)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = ramp_x[None, :]
    pixels[..., 1] = ramp_y[:, None]
    pixels[..., 2] = 128
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def decode_seconds(data: bytes) -> float:
    """The fastest of two decodes of `data` by training's decoder (what the service runs)."""
    times = []
    for _ in range(2):
        started = time.perf_counter()
        decode_image(tf.constant(data)).numpy()
        times.append(time.perf_counter() - started)
    return min(times)


def decode_b64(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


@pytest.fixture()
def small_heatmap_client(settings: ServiceSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"heatmap_max_side": 256}))) as client:
        yield client


@pytest.mark.timeout(300)
def test_36_megapixel_png_answers_fast_with_bounded_memory(client, settings) -> None:
    data = gradient_png(6000, 6000)
    assert len(data) < 200_000 and settings.max_image_pixels >= 6000 * 6000
    # warm up: the compiled TF step and the thread pools are not what is measured
    assert client.post("/predict", files={"file": ("x.png", image_bytes())}).status_code == 200
    with PeakRss() as rss:
        started = time.perf_counter()
        response = client.post("/predict", files={"file": ("big.png", data, "image/png")})
        elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    one_decode = decode_seconds(data)  # the least an answer costs, here, now (after the RSS)
    # Against the decode measured moments after, not a fixed time: a loaded machine slows
    # both (a fixed 2 s bound failed under load). Measured 1.3x one decode (0.33 s) idle, 1.5-1.6x
    # beside three busy processes on 2 cores, and ~135 MiB;
    # before the fix 25-45 s (about 50x), 0.7-1.5 GiB.
    assert elapsed < 4 * one_decode + 0.5, (
        f"36 Mpx PNG took {elapsed:.1f} s, one decode {one_decode:.2f} s "
        f"({response.json()['timings_ms']})"
    )
    assert rss.growth < 300 * MIB, f"RSS grew {rss.growth / MIB:.0f} MiB"
    for key in ("raw_hm_img", "overlaid_img"):
        shown = decode_b64(response.json()[key])
        assert shown.shape[:2] == (settings.heatmap_max_side, settings.heatmap_max_side)


def test_heatmaps_are_bounded_and_keep_the_aspect_ratio(small_heatmap_client) -> None:
    response = small_heatmap_client.post(
        "/predict", files={"file": ("wide.png", gradient_png(3000, 1200), "image/png")}
    )
    assert response.status_code == 200, response.text
    for key in ("raw_hm_img", "overlaid_img"):
        assert decode_b64(response.json()[key]).shape[:2] == (102, 256)  # 3000:1200 = 256:102.4
    small = small_heatmap_client.post("/predict", files={"file": ("x.png", image_bytes())})
    assert decode_b64(small.json()["overlaid_img"]).shape[:2] == (48, 64)  # never upscaled


def shapes_8bit() -> np.ndarray:
    """A mid-grey picture with a bright square and a dark disc (8-bit grey)."""
    grey = np.full((60, 80), 90, np.uint8)
    grey[10:35, 12:40] = 220
    cv2.circle(grey, (58, 38), 14, 25, -1)
    return grey


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes via OpenCV, which writes 16-bit grey and 16-bit colour PNGs."""
    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("channels", [1, 3], ids=["grey16", "rgb16"])
def test_16_bit_png_overlay_is_the_image_the_model_saw(client, channels: int) -> None:
    grey = shapes_8bit()
    pixels8 = grey if channels == 1 else np.dstack([grey, grey // 2, 255 - grey])
    pixels16 = pixels8.astype(np.uint16) * 257  # the same picture in 16 bits
    assert Image.open(io.BytesIO(png(pixels16))).mode in ("I;16", "I", "RGB")
    bodies = [
        client.post("/predict", files={"file": ("x.png", png(p), "image/png")}).json()
        for p in (pixels8, pixels16)
    ]
    eight, sixteen = bodies
    assert sixteen["predicted_class"] == eight["predicted_class"]
    for c, p in eight["prediction"].items():
        assert sixteen["prediction"][c] == pytest.approx(p, abs=1e-6)
    overlay8, overlay16 = (decode_b64(b["overlaid_img"]).astype(float) for b in bodies)
    assert overlay16.mean() < 200, "16-bit overlay is nearly white (clipped, not scaled)"
    assert abs(overlay16.mean() - overlay8.mean()) < 2.0
    assert np.abs(overlay16 - overlay8).mean() < 2.0
