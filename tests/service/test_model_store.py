"""Hidden-layer features in the service: computed when the metadata names a layer of the model,
absent (None in the response, NULL in the DB) for models without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from cvops.service.app import create_app
from cvops.service.model_store import load_model
from cvops.service.settings import ServiceSettings
from cvops.storage import CentralStorage
from tests.service.conftest import image_bytes, package
from tests.service.test_api import wait_for_rows


def test_infer_returns_hidden_features_only_for_a_named_layer(tmp_path: Path) -> None:
    package(tmp_path, "with_hidden", "1", seed=3)
    package(tmp_path, "without_hidden", "1", seed=3, hidden_layer=None)
    batch = np.random.default_rng(0).random((2, 50, 50, 3), dtype=np.float32)
    storage = CentralStorage(tmp_path)
    with_hidden = load_model(storage, "with_hidden.yaml").infer(batch)
    without = load_model(storage, "without_hidden.yaml").infer(batch)
    assert with_hidden[3].shape == (2, 64) and without[3].shape == (2, 0)
    for a, b in zip(with_hidden[:3] + with_hidden[4:], without[:3] + without[4:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the rest is unchanged


def test_model_without_hidden_layer_stores_null(tmp_path: Path) -> None:
    package(tmp_path / "cs", "plain", "1", seed=5, hidden_layer=None)
    settings = ServiceSettings(
        central_storage_path=tmp_path / "cs",
        state_dir=tmp_path / "state",
        metadata_file="plain.yaml",
        admin_token="s3cret",
    )
    with TestClient(create_app(settings)) as client:
        body = client.post("/predict", files={"file": ("x.png", image_bytes())}).json()
        assert body["hidden_feats"] is None and len(body["uae_feats"]) == 32
        assert wait_for_rows(settings.resolved_db_url, "predictions", 1) == 1
    engine = create_engine(settings.resolved_db_url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT hidden_feats FROM predictions")).scalar_one()
    engine.dispose()
    assert stored is None


def test_bbsd_read_off_the_classifier_equals_the_packaged_detector(tmp_path: Path) -> None:
    """BBSD from the Grad-CAM forward pass gives the packaged detector's numbers; a detector
    that is not the classifier's own (changed weights) keeps its own pass, and its numbers."""
    import keras

    from cvops.service.model_store import shared_bbsd_tensor
    from cvops.storage import read_metadata

    package(tmp_path, "shared", "1", seed=4)
    storage = CentralStorage(tmp_path)
    meta = read_metadata(storage.metadata_path("shared.yaml"))
    model = keras.models.load_model(storage.resolve(meta.model_path), compile=False)
    bbsd = keras.models.load_model(storage.resolve(meta.bbsd_model_path), compile=False)
    assert shared_bbsd_tensor(model, bbsd, -1, (50, 50)) is not None
    batch = np.random.default_rng(1).random((3, 50, 50, 3), dtype=np.float32)
    _, _, bbsd_feats, _, _ = load_model(storage, "shared.yaml").infer(batch)
    np.testing.assert_allclose(bbsd_feats, bbsd(batch).numpy(), rtol=1e-5, atol=1e-6)

    changed = [w + 0.01 for w in bbsd.get_weights()]  # a detector that is not the classifier
    bbsd.set_weights(changed)
    bbsd.save(storage.resolve(meta.bbsd_model_path))
    assert shared_bbsd_tensor(model, bbsd, -1, (50, 50)) is None
    probs, _, bbsd_feats, _, _ = load_model(storage, "shared.yaml").infer(batch)
    np.testing.assert_allclose(bbsd_feats, bbsd(batch).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(bbsd_feats, probs, atol=1e-4)


def test_upload_inference_equals_decode_prepare_and_batched_step(tmp_path: Path) -> None:
    """A lone request's one-call path (decode and resize inside the compiled graph) gives what
    the batched path gives for the same upload (training's decode, the NumPy resize, the
    step), for JPEG and PNG; bytes TensorFlow cannot decode raise its error (the route then
    takes the batched path, with its fallbacks and reasons)."""
    import tensorflow as tf

    from cvops.service.images import read_upload

    package(tmp_path, "fused", "1", seed=7)
    loaded = load_model(CentralStorage(tmp_path), "fused.yaml")
    assert loaded.infer_upload is not None
    for fmt, size in (("JPEG", (120, 90)), ("PNG", (64, 48)), ("PNG", (31, 77))):
        data = image_bytes(fmt, size, seed=len(fmt) + size[0])
        rgb, x, outputs = loaded.infer_upload(data)
        decoded, _ = read_upload(data, 40_000_000)
        np.testing.assert_array_equal(rgb, decoded)
        np.testing.assert_allclose(x, loaded.prepare(decoded), rtol=1e-5, atol=1e-6)
        batched = loaded.infer(loaded.prepare(decoded)[None])
        for fused, expected in zip(outputs, batched, strict=True):
            assert fused.shape == expected.shape
            np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-5)
    try:
        loaded.infer_upload(image_bytes("JPEG")[:200])
    except tf.errors.OpError:
        pass
    else:
        raise AssertionError("a truncated JPEG decoded")
