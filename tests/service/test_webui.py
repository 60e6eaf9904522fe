"""Web UI: the page itself, and a real headless Chromium uploading through it.

The browser tests run against real gunicorn workers (`ServiceProcess`) so that two users really
can be answered by different processes at the same time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import ServiceProcess, image_bytes

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

REPO = Path(__file__).resolve().parents[2]
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium tries to reach Google's services; there is no internet.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1100,900",
)
WAIT_S = 90


def test_page_is_self_contained(client: TestClient) -> None:
    for path in ("/", "/ui"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["content-security-policy"]
        html = response.text
        assert 'const PREDICT_URL = "predict";' in html  # relative: works behind a path prefix
        assert "http://" not in html and "https://" not in html  # no CDN, no external origin
        assert 'name="file"' in html
    assert "/" not in client.get("/openapi.json").json()["paths"]


# --- real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromedriver() -> str:
    """Chromium and its driver (Debian packages), installed when missing and we may."""
    if not (shutil.which(CHROMEDRIVER) and shutil.which(CHROMIUM)):
        script = REPO / "scripts" / "install-system-deps.sh"
        done = subprocess.run(
            [str(script), "chromium", "chromium-driver"], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.fail(f"chromium/chromium-driver missing and not installable: {done.stderr}")
    return CHROMEDRIVER


@pytest.fixture(scope="module")
def service(storage_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ServiceProcess(storage_root, tmp_path_factory.mktemp("webui_service")) as svc:
        yield svc.base


@pytest.fixture(scope="module")
def new_browser(
    chromedriver: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], WebDriver]]:
    """Factory of headless Chromium sessions, each with its own fresh profile; all quit after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[WebDriver] = []

    def make() -> WebDriver:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
        driver.set_page_load_timeout(WAIT_S)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


@pytest.fixture(scope="module")
def browsers(new_browser: Callable[[], WebDriver]) -> tuple[WebDriver, WebDriver]:
    """Two independent users (separate profiles, separate cookies)."""
    return new_browser(), new_browser()


def write_image(tmp_path: Path, name: str, seed: int, size: tuple[int, int]) -> Path:
    path = tmp_path / name
    path.write_bytes(image_bytes("PNG", size=size, seed=seed))
    return path


def api_predict(base: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        response = httpx.post(f"{base}/predict", files={"file": (path.name, f)}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def choose_and_submit(driver: WebDriver, base: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/")
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.ID, "submit").click()


def wait_finished(driver: WebDriver) -> str:
    """Waits until the page shows a result or an error; returns which."""
    from selenium.webdriver.support.ui import WebDriverWait

    state = WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script(
            "const s = document.body.dataset.state; return s === 'done' || s === 'error' ? s : null"
        )
    )
    return str(state)


def shown_result(driver: WebDriver) -> dict[str, Any]:
    """What the page displays: top class, model line and the probability list."""
    return driver.execute_script(
        """
        const probs = {};
        for (const li of document.querySelectorAll('#probs li')) {
          probs[li.dataset.class] = parseFloat(li.dataset.prob);
        }
        return {
          predicted: document.getElementById('predicted-class').textContent,
          model: document.getElementById('model').textContent,
          probs: probs,
          visible: document.getElementById('result').offsetParent !== null,
        };
        """
    )


def loaded_width(driver: WebDriver, image_id: str) -> int:
    """naturalWidth of an <img> once it has finished loading (0 if it failed)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return int(
        WebDriverWait(driver, WAIT_S).until(
            lambda d: d.execute_script(
                "const i = document.getElementById(arguments[0]);"
                "return i.complete ? [i.naturalWidth] : null;",
                image_id,
            )
        )[0]
    )


def assert_shows(driver: WebDriver, expected: dict[str, Any]) -> None:
    shown = shown_result(driver)
    assert shown["visible"]
    assert shown["predicted"] == expected["predicted_class"]
    assert shown["model"] == f"{expected['model_name']} v{expected['model_version']}"
    assert shown["probs"] == pytest.approx(expected["prediction"], abs=1e-9)


@pytest.mark.slow
def test_upload_shows_prediction_and_heatmap(
    service: str, browsers: tuple[WebDriver, WebDriver], tmp_path: Path
) -> None:
    driver = browsers[0]
    image = write_image(tmp_path, "one.png", seed=11, size=(64, 48))
    expected = api_predict(service, image)

    choose_and_submit(driver, service, image)
    assert wait_finished(driver) == "done"
    assert_shows(driver, expected)
    # The overlay and raw heatmap come back at the input's size.
    assert loaded_width(driver, "overlay") == 64
    assert loaded_width(driver, "heatmap") == 64
    assert loaded_width(driver, "input-img") == 64
    screenshot = tmp_path / "webui.png"
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 0
    if shot_dir := os.environ.get("CVOPS_WEBUI_SCREENSHOT_DIR"):  # for a look by a human
        shutil.copy(screenshot, Path(shot_dir) / "webui.png")


@pytest.mark.slow
def test_two_users_at_once_each_see_their_own_result(
    service: str, browsers: tuple[WebDriver, WebDriver], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    sizes = [(80, 60), (30, 30)]
    images = [
        write_image(tmp_path, f"user{i}.png", seed=21 + i, size=size)
        for i, size in enumerate(sizes)
    ]
    expected = [api_predict(service, image) for image in images]
    # The check only means something if the two answers differ.
    assert expected[0]["prediction"] != pytest.approx(expected[1]["prediction"], abs=1e-6)

    for driver in browsers:
        driver.get(f"{service}/")
    for driver, image in zip(browsers, images, strict=True):
        driver.find_element(By.ID, "file").send_keys(str(image))
    for driver in browsers:  # both requests in flight together
        driver.find_element(By.ID, "submit").click()
    for driver, answer, (width, _) in zip(browsers, expected, sizes, strict=True):
        assert wait_finished(driver) == "done"
        assert_shows(driver, answer)
        assert loaded_width(driver, "overlay") == width


@pytest.mark.slow
def test_non_image_upload_shows_the_reason(
    service: str, browsers: tuple[WebDriver, WebDriver], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    detail = httpx.post(f"{service}/predict", files={"file": ("notes.txt", b"x")}).json()["detail"]
    assert detail

    driver = browsers[1]
    choose_and_submit(driver, service, text)
    assert wait_finished(driver) == "error"
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text.startswith("Error 422:")
    assert "not an image" in error.text
    assert not driver.find_element(By.ID, "result").is_displayed()
