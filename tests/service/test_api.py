"""The service contract through the real app (TestClient runs the lifespan)."""

from __future__ import annotations

import base64
import dataclasses
import gc
import io
import json
import os
import re
import socket
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from tests.service.conftest import CLASSES, image_bytes

AUTH = {"Authorization": "Bearer s3cret"}


def wait_for_rows(url: str, table: str, n: int, timeout: float = 10.0) -> int:
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        try:
            with engine.connect() as conn:
                count = conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
        except Exception:
            count = 0
        if count >= n:
            break
        time.sleep(0.1)
    engine.dispose()
    return count


def test_health_and_ready(client) -> None:
    health = client.get("/health_check").json()
    assert health == {
        "status": "ok",
        "model_loaded": True,
        "model_name": "shapes_a",
        "model_version": "1",
        "metadata_file": "shapes_a.yaml",
        "mlflow_run_id": None,
        "instance_id": None,
        "replica": f"{socket.gethostname()}:{os.getpid()}",
        "generation": 1,
    }
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize("path", ["/predict", "/predict/"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_predict_contract(client, path: str, fmt: str) -> None:
    response = client.post(path, files={"file": (f"x.{fmt.lower()}", image_bytes(fmt), "image/x")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "shapes_a" and body["message"] == "Success"
    assert set(body["prediction"]) == set(CLASSES)
    assert abs(sum(body["prediction"].values()) - 1) < 1e-4
    assert body["predicted_class"] == max(body["prediction"], key=body["prediction"].get)
    assert len(body["uae_feats"]) == 32 and len(body["bbsd_feats"]) == 3
    assert len(body["hidden_feats"]) == 64  # the pooled conv features
    np.testing.assert_allclose(
        body["bbsd_feats"], [body["prediction"][c] for c in CLASSES], rtol=1e-4
    )
    for key in ("raw_hm_img", "overlaid_img"):
        img = Image.open(io.BytesIO(base64.b64decode(body[key])))
        assert img.format == "PNG" and img.size == (64, 48)


def test_predictions_and_api_log_are_written(client, settings) -> None:
    bodies = [
        client.post("/predict", files={"file": ("x.png", image_bytes(seed=i))}).json()
        for i in range(3)
    ]
    ids = [body["prediction_id"] for body in bodies]
    assert len(set(ids)) == 3
    url = settings.resolved_db_url
    assert wait_for_rows(url, "predictions", 3) == 3
    assert wait_for_rows(url, "api_log", 3) >= 3
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT prediction_id, status, method FROM api_log")).all()
        stored = dict(conn.execute(text("SELECT id, hidden_feats FROM predictions")).all())
    engine.dispose()
    assert {r[0] for r in rows if r[0]} == set(ids)
    assert all(r[1] == 200 and r[2] == "POST" for r in rows)
    for body in bodies:  # the monitor's third embedding is stored with every prediction
        hidden = stored[body["prediction_id"]]
        hidden = json.loads(hidden) if isinstance(hidden, str) else hidden
        np.testing.assert_allclose(hidden, body["hidden_feats"], rtol=1e-6)


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b"", 422, "empty"),
        (b"definitely not an image", 422, "not an image"),
        (image_bytes("JPEG")[:200], 422, "corrupt"),
    ],
)
def test_bad_uploads_get_clear_4xx(client, payload: bytes, status: int, reason: str) -> None:
    response = client.post("/predict", files={"file": ("x.jpg", payload, "image/jpeg")})
    assert response.status_code == status
    assert reason in response.json()["detail"]


def test_huge_dimensions_and_missing_field(client) -> None:
    big = image_bytes("PNG", size=(8000, 6000))
    response = client.post("/predict", files={"file": ("big.png", big)})
    assert response.status_code == 413 and "too large" in response.json()["detail"]
    assert client.post("/predict", data={"other": "x"}).status_code == 422


def test_update_model_requires_token(client) -> None:
    assert client.put("/update_model/shapes_b.yaml").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.put("/update_model/shapes_b.yaml", headers=wrong).status_code == 401


@pytest.mark.parametrize(
    ("name", "status"),
    [("missing.yaml", 404), ("..%2F..%2Fetc%2Fpasswd", 400), ("shapes_a.txt", 400)],
)
def test_update_model_rejects_bad_names(client, name: str, status: int) -> None:
    response = client.put(f"/update_model/{name}", headers=AUTH)
    assert response.status_code in (status, 404), response.text
    assert client.get("/health_check").json()["model_name"] == "shapes_a"


def test_update_model_switches_and_bad_model_keeps_old(client, storage_root) -> None:
    response = client.put("/update_model/shapes_b.yaml", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "7"
    body = client.post("/predict", files={"file": ("x.png", image_bytes())}).json()
    assert body["model_name"] == "shapes_b" and body["model_version"] == "7"

    broken = storage_root / "models" / "broken.yaml"
    broken.write_text(
        (storage_root / "models" / "shapes_a.yaml")
        .read_text()
        .replace("models/shapes_a.keras", "models/does_not_exist.keras")
    )
    response = client.put("/update_model/broken.yaml", headers=AUTH)
    assert response.status_code == 422 and "cannot load" in response.json()["detail"]
    assert client.get("/health_check").json()["model_name"] == "shapes_b"


def test_served_model_is_out_of_the_collectors_view_and_a_replaced_one_freed(client) -> None:
    """A full garbage collection must not walk TensorFlow and the model on every run (270-460
    ms with the GIL held per worker); they are frozen once a model is served, and a model a
    reload replaced is collected, not frozen with the rest (no leak per reload)."""
    state = client.app.state.svc
    assert gc.get_freeze_count() > 100_000  # TensorFlow, Keras and the model
    started = time.perf_counter()
    gc.collect()
    full_collection_s = time.perf_counter() - started
    old = weakref.ref(state.model)
    assert client.put("/update_model/shapes_b.yaml", headers=AUTH).status_code == 200
    assert old() is None  # the replaced model is gone: collected before the heap was frozen
    gc.unfreeze()
    started = time.perf_counter()
    gc.collect()
    assert full_collection_s < (time.perf_counter() - started) / 5  # what freezing saved
    gc.freeze()


def batch_sizes(client) -> tuple[float, float]:
    """(images, model calls) so far, from the batch-size histogram."""
    metrics = client.get("/metrics").text
    images = re.search(r"^cvops_batch_size_sum (\S+)$", metrics, re.M)
    calls = re.search(r"^cvops_batch_size_count (\S+)$", metrics, re.M)
    assert images and calls, metrics
    return float(images.group(1)), float(calls.group(1))


def test_concurrent_requests_share_model_calls(client) -> None:
    """Overlapping requests share model calls: the throughput at concurrency depends on it
    (running a lone request at once on the event loop looked free and cut c=32 by 31%:
    under load, most requests found no other one between upload and answer)."""
    before = batch_sizes(client)

    def post(i: int) -> int:
        upload = {"file": ("x.png", image_bytes(seed=i))}
        return client.post("/predict", files=upload).status_code

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(post, range(64))) == [200] * 64
    images, calls = batch_sizes(client)
    assert images - before[0] == 64
    assert calls - before[1] < 64  # some model calls served more than one request


def test_metrics_exposed(client) -> None:
    client.post("/predict", files={"file": ("x.png", image_bytes())})
    text_body = client.get("/metrics").text
    assert "cvops_requests_total" in text_body
    assert 'cvops_predictions_total{model="shapes_a"' in text_body
    assert "cvops_batch_size_bucket" in text_body
    # where the time of a prediction goes, stage by stage
    for stage in ("preprocess", "queue", "inference", "render", "spool"):
        count = re.search(rf'cvops_stage_seconds_count{{stage="{stage}"}} (\S+)', text_body)
        assert count and float(count.group(1)) >= 1, stage


def test_predict_without_heatmaps(client, settings) -> None:
    """A client that only needs the class skips the heatmap images; the rest is unchanged,
    and the stored prediction has no heatmap images either."""
    upload = {"file": ("x.png", image_bytes(seed=3))}
    full = client.post("/predict", files=upload).json()
    lean = client.post("/predict", params={"heatmaps": "false"}, files=upload).json()
    assert lean["raw_hm_img"] is None and lean["overlaid_img"] is None
    assert full["raw_hm_img"] and full["overlaid_img"]
    assert lean["predicted_class"] == full["predicted_class"]
    np.testing.assert_allclose(
        list(lean["prediction"].values()), list(full["prediction"].values()), rtol=1e-5
    )
    assert "render" not in lean["timings_ms"] or lean["timings_ms"]["render"] < 1
    assert client.post("/predict", params={"heatmaps": "maybe"}, files=upload).status_code == 422
    url = settings.resolved_db_url
    assert wait_for_rows(url, "predictions", 2) == 2
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, overlaid_img FROM predictions")).all())
    engine.dispose()
    assert rows[lean["prediction_id"]] is None and rows[full["prediction_id"]]


def test_direct_lane_answers_as_the_route(client, settings, monkeypatch) -> None:
    """An ordinary `POST /predict` skips FastAPI's stack (`ServiceApp`'s direct lane); its
    answer, records and metrics are the route's. Anything else still goes through the stack,
    once: a bad upload gets the route's 4xx and one api_log row."""
    from fastapi import FastAPI

    stack_calls: list[str] = []
    through_stack = FastAPI.__call__

    async def counted(self, scope, receive, send):  # type: ignore[no-untyped-def]
        stack_calls.append(scope["path"] + "?" + scope["query_string"].decode())
        await through_stack(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", counted)
    upload = {"file": ("x.png", image_bytes(seed=5))}
    answers = {
        "lane": client.post("/predict", files=upload),
        "lane, no heatmaps": client.post("/predict?heatmaps=false", files=upload),
        "route": client.post("/predict/", files=upload),
        "route, no heatmaps": client.post("/predict/?heatmaps=0", files=upload),
    }
    bad = client.post("/predict", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
    assert stack_calls == ["/predict/?", "/predict/?heatmaps=0", "/predict?"]
    assert bad.status_code == 422 and "not an image" in bad.json()["detail"]
    for name, answer in answers.items():
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == "application/json", name
        assert answer.headers["x-cvops-worker"] == str(os.getpid()), name
    bodies = {name: answer.json() for name, answer in answers.items()}
    for body in bodies.values():
        del body["timings_ms"]
    ids = {name: body.pop("prediction_id") for name, body in bodies.items()}
    assert bodies["lane"] == bodies["route"] and bodies["lane"]["raw_hm_img"]
    assert bodies["lane, no heatmaps"] == bodies["route, no heatmaps"]
    assert bodies["lane, no heatmaps"]["overlaid_img"] is None
    url = settings.resolved_db_url
    assert wait_for_rows(url, "predictions", 4) == 4
    assert wait_for_rows(url, "api_log", 5) == 5
    engine = create_engine(url)
    with engine.connect() as conn:
        logged = conn.execute(text("SELECT url, status, prediction_id FROM api_log")).all()
        stored = {r[0] for r in conn.execute(text("SELECT id FROM predictions")).all()}
    engine.dispose()
    assert stored == set(ids.values())
    assert sorted((u, s) for u, s, _ in logged) == sorted(
        [("/predict", 200)] * 2 + [("/predict/", 200)] * 2 + [("/predict", 422)]
    )
    assert {p for *_, p in logged if p} == set(ids.values())
    metrics = client.get("/metrics").text
    for route, status, count in (("/predict", 200, 2), ("/predict/", 200, 2), ("/predict", 422, 1)):
        line = f'cvops_requests_total{{method="POST",route="{route}",status="{status}"}}'
        assert f"{line} {count}.0" in metrics, line


def test_not_ready_without_model(settings, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from cvops.service.app import create_app

    empty = settings.model_copy(
        update={"central_storage_path": tmp_path / "empty", "metadata_file": None}
    )
    with TestClient(create_app(empty)) as c:
        assert c.get("/ready").status_code == 503
        assert c.get("/health_check").json()["model_loaded"] is False
        assert c.post("/predict", files={"file": ("x.png", image_bytes())}).status_code == 503


def test_oversized_body_rejected_with_or_without_length(settings) -> None:
    from fastapi.testclient import TestClient

    from cvops.service.app import create_app

    small = settings.model_copy(update={"max_body_bytes": 50_000})
    big = image_bytes("PNG", size=(400, 400))
    assert len(big) > 50_000
    with TestClient(create_app(small)) as c:
        declared = c.post("/predict", files={"file": ("x.png", big)})
        assert declared.status_code == 413 and "too large" in declared.json()["detail"]

        def chunks():
            body = b"--b\r\nContent-Disposition: form-data; name=file; filename=x.png\r\n\r\n"
            yield body + big + b"\r\n--b--\r\n"

        chunked = c.post(
            "/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert chunked.status_code == 413
        assert c.post("/predict", files={"file": ("x.png", image_bytes())}).status_code == 200


def test_feedback_is_stored_and_validated(client, settings) -> None:
    pid = client.post("/predict", files={"file": ("x.png", image_bytes())}).json()["prediction_id"]
    ok = client.post(f"/feedback/{pid}", json={"label": "square"})
    assert ok.status_code == 200 and ok.json()["label"] == "square"
    wrong = client.post(f"/feedback/{pid}", json={"label": "giraffe"})
    assert wrong.status_code == 422 and "giraffe" in wrong.json()["detail"]
    assert client.post("/feedback/not-a-uuid", json={"label": "square"}).status_code == 422
    assert wait_for_rows(settings.resolved_db_url, "feedback", 1) == 1


def test_latest_drift_scores_exposed_as_gauges(settings, storage_root) -> None:
    from fastapi.testclient import TestClient

    from cvops.monitor.run import run_monitor
    from cvops.service.app import create_app
    from cvops.storage import CentralStorage

    fast = settings.model_copy(update={"drift_refresh_s": 0.2})
    with TestClient(create_app(fast)) as c:
        for i in range(12):
            assert c.post("/predict", files={"file": ("x.png", image_bytes(seed=i))}).is_success
        assert wait_for_rows(fast.resolved_db_url, "predictions", 12) == 12
        check = run_monitor(CentralStorage(storage_root), "shapes_a.yaml", fast.resolved_db_url)
        assert check.window.size == 12
        deadline = time.monotonic() + 10
        body = ""
        while time.monotonic() < deadline:
            body = c.get("/metrics").text
            if 'cvops_drift_score{embedding="uae",method="mmd",model="shapes_a"}' in body:
                break
            time.sleep(0.2)
        assert 'cvops_drift_score{embedding="uae",method="mmd",model="shapes_a"}' in body
        assert 'cvops_drift_detected{embedding="bbsd",method="ks",model="shapes_a"}' in body


def test_openapi_schema_says_what_is_accepted(
    settings, storage_root, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated clients know the constraints: a non-empty file, a `<name>.yaml` metadata file
    and a label among the served model's classes (which change with the model)."""
    import re
    import shutil

    from fastapi.testclient import TestClient

    from cvops.service.app import create_app
    from tests.service import conftest

    storage = tmp_path / "cs"
    shutil.copytree(storage_root, storage)
    fruit = ["apple", "pear", "plum"]
    monkeypatch.setattr(conftest, "CLASSES", fruit)
    conftest.package(storage, "fruit", "1", seed=3)
    with TestClient(create_app(settings.model_copy(update={"central_storage_path": storage}))) as c:
        schema = c.get("/openapi.json").json()
        components = schema["components"]["schemas"]
        body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
        file = components[body["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]["file"]
        assert file["format"] == "binary" and file["minLength"] == 1
        empty = c.post("/predict", files={"file": ("x.png", b"")})
        assert empty.status_code == 422 and "empty" in empty.json()["detail"]

        (param,) = schema["paths"]["/update_model/{metadata_file}"]["put"]["parameters"]
        pattern = param["schema"]["pattern"]
        names = ("a.yaml", "A-1_b.c.yml", ".a.yaml", "a.txt", "a b.yaml", "-a.yaml", "a.yaml.bak")
        for name in names:  # the service refuses exactly what the pattern does
            matches = re.search(pattern, name) is not None
            answer = c.put(f"/update_model/{name}", headers=AUTH)
            assert answer.status_code == (404 if matches else 400), (name, answer.text)
        # JSON Schema's `$` is the end of the string (Python's also matches before a final \n)
        assert c.put("/update_model/a.yaml%0A", headers=AUTH).status_code == 400

        label = components["FeedbackRequest"]["properties"]["label"]
        assert label["enum"] == CLASSES
        assert c.put("/update_model/fruit.yaml", headers=AUTH).status_code == 200
        label = c.get("/openapi.json").json()["components"]["schemas"]["FeedbackRequest"]
        assert label["properties"]["label"]["enum"] == fruit  # not cached across the swap


def test_a_lone_request_takes_the_one_call_path_with_the_batched_answer(client) -> None:
    """A request on its own is decoded, resized and inferred in one TensorFlow call; its
    answer is the one the batched path gives (the model without its one-call function)."""
    state = client.app.state.svc
    model = state.model
    calls: list[int] = []

    def counted(data: bytes):  # type: ignore[no-untyped-def]
        calls.append(len(data))
        return model.infer_upload(data)

    upload = {"file": ("x.jpg", image_bytes("JPEG", (120, 90), seed=11))}
    try:
        state.model = dataclasses.replace(model, infer_upload=counted)
        alone = client.post("/predict", files=upload).json()
        state.model = dataclasses.replace(model, infer_upload=None)
        batched = client.post("/predict", files=upload).json()
    finally:
        state.model = model
    assert len(calls) == 1
    assert alone["predicted_class"] == batched["predicted_class"]
    for key in ("uae_feats", "bbsd_feats", "hidden_feats"):
        np.testing.assert_allclose(alone[key], batched[key], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        list(alone["prediction"].values()), list(batched["prediction"].values()), atol=1e-5
    )
    heat = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(r["raw_hm_img"])))).astype(int)
        for r in (alone, batched)
    ]
    assert heat[0].shape == heat[1].shape == (90, 120, 3)
    # the Grad-CAM maps agree to float32 rounding; a level of the colour map can flip
    differ = np.abs(heat[0] - heat[1]).max(axis=2)
    assert (differ > 0).mean() < 0.01 and differ.max() <= 8
