"""Backbones from config: every family builds, explains (Grad-CAM), embeds (drift), is served
and monitored; pretrained weights load from a file (or the cache) or fail with one clear error;
fine-tuning runs in two phases with BatchNorm frozen. No downloads: weights none or files the
tests write."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import uuid
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from cvops.config import APPLICATION_BACKBONES, ConfigError, DriftDetectionConfig, parse_config
from cvops.model import backbones
from cvops.model.backbones import (
    FEATURES_LAYER,
    WeightsError,
    cam_source,
    nested_backbone,
    set_backbone_trainable,
    training_phases,
)
from cvops.model.build import build_model
from cvops.model.drift import build_bbsd, build_hidden, build_uae, reference_frame
from cvops.model.gradcam import gradcam, gradient_model
from cvops.model.train import Splits, fit_model, save_package
from cvops.storage import CentralStorage, InputSize, ModelMetadata, utc_now

SIZE = 64  # keras.applications need >= 32; at 32 their last feature map is 1x1
CLASSES = ["circle", "square", "triangle"]
ALL_BACKBONES = ("reference_cnn", "small_cnn", *APPLICATION_BACKBONES)
# name -> channels of the feature map feeding `features`, its side at SIZE
FEATURE_MAPS = {
    "reference_cnn": (64, 27),
    "small_cnn": (128, 16),
    "mobilenet_v3_small": (576, 2),
    "mobilenet_v3_large": (960, 2),
    "efficientnet_v2_b0": (1280, 2),
    "resnet50": (2048, 2),
}


def model_section(**extra: object) -> dict[str, object]:
    return {
        "model_name": "bb",
        "input_size": {"w": SIZE, "h": SIZE},
        "classes": CLASSES,
        **extra,
    }


def config(tmp_path: Path, model: dict[str, object], **train: object) -> object:
    return parse_config(
        {
            "flow_module": "cvops.flows.train_flow",
            "seed": 3,
            "model": model,
            "dataset": {"ds_root": str(tmp_path), "ds_name": "ds", "val_fraction": 0.0},
            "train": {
                "hparams": {"epochs": 2, "batch_size": 8, "init_lr": 0.01},
                "mlflow": {"exp_name": "unused"},
                "augmentation": {"enabled": False},
                "lr_schedule": {"kind": "none"},
                **train,
            },
        }
    )


# --- config ------------------------------------------------------------------------------------


def test_default_backbone_is_small_cnn_and_the_reference_cnn_stays_selectable() -> None:
    """The default was chosen by measurement (benchmarks/results/accuracy.md); a config
    without model.backbone (a reference config) now trains small_cnn from scratch."""
    cfg = parse_config({"flow_module": "cvops.flows.train_flow", "model": model_section()})
    assert cfg.model.backbone == "small_cnn" and cfg.model.weights == "none"
    assert cfg.train is None  # finetune defaults live in train, which this config lacks
    model = build_model((SIZE, SIZE), 3, backbone=cfg.model.backbone, weights=cfg.model.weights)
    assert model.name == "cvops_small_cnn" and nested_backbone(model).name == "small_cnn"

    cfg = parse_config(
        {
            "flow_module": "cvops.flows.train_flow",
            "model": model_section(backbone="reference_cnn"),
        }
    )
    assert cfg.model.backbone == "reference_cnn" and cfg.model.weights == "none"
    model = build_model((SIZE, SIZE), 3, backbone=cfg.model.backbone, weights=cfg.model.weights)
    assert model.name == "cvops_cnn" and nested_backbone(model) is None


def test_weights_default_per_backbone_and_flow_into_metadata() -> None:
    def section(**extra: object) -> object:
        return parse_config(
            {"flow_module": "cvops.flows.train_flow", "model": model_section(**extra)}
        ).model

    assert section(backbone="small_cnn").weights == "none"
    assert section(backbone="mobilenet_v3_small").weights == "imagenet"
    assert section(backbone="resnet50", weights="none").weights == "none"
    model = section(backbone="efficientnet_v2_b0")
    meta = ModelMetadata(
        **model.model_dump(mode="json", exclude={"save_dir"}),
        model_path="m",
        uae_model_path="u",
        bbsd_model_path="b",
        reference_data_path="r",
    )
    assert (meta.backbone, meta.weights) == ("efficientnet_v2_b0", "imagenet")
    old = ModelMetadata(
        model_name="x",
        input_size=InputSize(w=50, h=50),
        classes=CLASSES,
        model_path="m",
        uae_model_path="u",
        bbsd_model_path="b",
        reference_data_path="r",
    )
    assert (old.backbone, old.weights) == ("reference_cnn", "none")


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"backbone": "vgg99"}, "model.backbone", ["reference_cnn", "small_cnn"]),
        ({"backbone": "small_cnn", "weights": "/nowhere/w.weights.h5"}, "model.weights",
         ["/nowhere/w.weights.h5", "not found", "small_cnn"]),
        ({"backbone": "small_cnn", "weights": "imagenet"}, "model.weights", ["no imagenet"]),
        ({"backbone": "reference_cnn", "weights": "imagenet"}, "model.weights",
         ["reference_cnn", "none"]),
        ({"weights": "imagenet"}, "model.weights", ["small_cnn", "no imagenet"]),
        ({"backbone": "mobilenet_v3_small", "input_size": {"w": 28, "h": 64}}, "model.backbone",
         ["at least 32x32", "28x64"]),
    ],
)  # fmt: skip
def test_bad_backbone_or_weights_fail_at_config_load(
    extra: dict[str, object], field: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"flow_module": "cvops.flows.train_flow", "model": model_section(**extra)})
    message = str(err.value)
    assert f"{field}:" in message and all(w in message for w in words), message


def test_a_bad_backbone_is_one_error_not_also_one_about_its_weights() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "flow_module": "cvops.flows.train_flow",
                "model": model_section(backbone="vgg99", weights="imagenet"),
            }
        )
    assert "model.backbone:" in str(err.value) and "model.weights" not in str(err.value)


def test_finetune_defaults_and_bounds(tmp_path: Path) -> None:
    ft = config(tmp_path, model_section()).train.finetune
    assert (ft.warmup_epochs, ft.unfreeze_fraction, ft.lr_factor) == (3, 0.3, 0.1)
    with pytest.raises(ConfigError, match=r"train\.finetune\.lr_factor"):
        config(tmp_path, model_section(), finetune={"lr_factor": 0})


def test_config_and_backbones_list_the_same_families() -> None:
    from typing import get_args

    from cvops.config import Backbone

    assert set(get_args(Backbone)) == set(ALL_BACKBONES)
    assert tuple(backbones.FAMILIES) == APPLICATION_BACKBONES


# --- architecture and preprocessing ------------------------------------------------------------


def test_small_cnn_is_small_batchnormed_and_pools_late() -> None:
    model = build_model((SIZE, SIZE), 10, backbone="small_cnn")
    net = nested_backbone(model)
    assert net is not None and net.name == "small_cnn"
    assert 100_000 <= model.count_params() <= 400_000
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds.count("Conv2D") == 6 and kinds.count("BatchNormalization") == 6
    assert kinds.index("MaxPooling2D") > kinds.index("ReLU") + 3  # two convs before pooling
    assert model.get_layer(FEATURES_LAYER).input.shape == (None, 16, 16, 128)
    assert model.layers[-1].name == "classify_head" and model.output_shape == (None, 10)


@pytest.mark.parametrize("backbone", ["small_cnn", "mobilenet_v3_small"])
def test_batchnorm_statistics_follow_fast_from_scratch(backbone: str) -> None:
    """Keras' BatchNorm momentum (0.99, 0.999 in MobileNetV3) leaves the moving statistics
    wrong for thousands of steps: a short from-scratch training then evaluates at chance."""
    net = nested_backbone(build_model((SIZE, SIZE), 3, backbone=backbone, weights="none"))
    norms = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and {layer.momentum for layer in norms} == {backbones.SCRATCH_BN_MOMENTUM}


def test_resnet50_preprocessing_is_caffe_from_unit_range() -> None:
    layer = backbones._preprocessing("caffe")
    x = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    expected = keras.applications.resnet50.preprocess_input(x * 255.0)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-3)
    assert not layer.trainable


# --- every family through the loop (weights none) ----------------------------------------------


class Packaged:
    def __init__(self, backbone: str, root: Path) -> None:
        self.backbone = backbone
        keras.utils.set_random_seed(1)
        self.model = build_model((SIZE, SIZE), len(CLASSES), backbone=backbone, weights="none")
        uae = build_uae((SIZE, SIZE), 32, seed=1)
        bbsd = build_bbsd(self.model)
        hidden = build_hidden(self.model, "features")
        assert hidden is not None
        x = np.random.default_rng(1).random((48, SIZE, SIZE, 3), dtype=np.float32)
        ref = reference_frame(
            uae(x).numpy(), bbsd(x).numpy(), np.arange(48) % 3, CLASSES, hidden(x).numpy()
        )
        drift = DriftDetectionConfig()
        names = CentralStorage.artifact_names(backbone, drift)
        files = save_package(root / "_build", backbone, names, self.model, uae, bbsd, ref)
        meta = ModelMetadata(
            model_name=backbone,
            input_size=InputSize(w=SIZE, h=SIZE),
            classes=CLASSES,
            drift_detection=drift,
            backbone=backbone,
            weights="none",
            version="1",
            created_on=utc_now(),
            **names,
        )
        self.storage = CentralStorage(root)
        self.metadata_file = self.storage.publish(files, meta).name
        from cvops.service.model_store import load_model

        self.loaded = load_model(self.storage, self.metadata_file)  # the service's own path


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=pytest.mark.slow)
        if name in ("mobilenet_v3_large", "efficientnet_v2_b0", "resnet50")
        else name
        for name in ALL_BACKBONES
    ],
)
def packaged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Packaged:
    """Each family built, packaged and loaded by the service once: the big ones take seconds
    (MobileNetV3Small stands for the keras.applications families in the fast tests)."""
    return Packaged(request.param, tmp_path_factory.mktemp(request.param))


def test_gradcam_uses_the_map_feeding_features(packaged: Packaged) -> None:
    model = packaged.model
    channels, side = FEATURE_MAPS[packaged.backbone]
    source = cam_source(model)
    assert source is not None and tuple(source.shape) == (None, side, side, channels)
    net = nested_backbone(model)
    if net is not None:  # the nested network's own output, not a conv inside it
        assert source is model.get_layer(FEATURES_LAYER).input
        assert tuple(net.output.shape) == (None, side, side, channels)
    x = tf.random.uniform((6, SIZE, SIZE, 3), seed=4)
    grad_model = gradient_model(model)
    conv, _ = grad_model(x)[:2]
    hidden = build_hidden(model, "features")
    np.testing.assert_allclose(
        hidden(x).numpy(), conv.numpy().mean((1, 2)), rtol=1e-4, atol=1e-5
    )  # the drift embedding is the pooled CAM map
    probs, cams = gradcam(grad_model, x)
    cams = cams.numpy()
    assert probs.shape == (6, 3) and cams.shape == (6, side, side)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() == pytest.approx(1.0)
    assert any(np.ptp(c) > 0 for c in cams)  # not constant maps


def test_saved_package_is_served(packaged: Packaged) -> None:
    """The service's own path: .keras load, hidden layer, compiled Grad-CAM inference."""
    loaded = packaged.loaded
    assert loaded.metadata.backbone == packaged.backbone
    x = np.random.default_rng(2).random((3, SIZE, SIZE, 3), dtype=np.float32)
    probs, uae, bbsd, hidden, cams = loaded.infer(x)
    np.testing.assert_allclose(probs, packaged.model(x).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bbsd, probs, rtol=1e-5, atol=1e-6)
    source = cam_source(packaged.model)
    assert source is not None
    assert uae.shape == (3, 32) and hidden.shape == (3, source.shape[-1])
    assert cams.shape == (3, *source.shape[1:3])


def test_monitor_monitors_its_embeddings(packaged: Packaged, tmp_path: Path) -> None:
    from cvops.monitor.run import run_monitor
    from cvops.records.schema import make_engine, upgrade_schema
    from cvops.service.recording import write_batch

    loaded = packaged.loaded
    x = np.random.default_rng(5).random((40, SIZE, SIZE, 3), dtype=np.float32)
    _, uae, bbsd, hidden, _ = loaded.infer(x)
    url = f"sqlite:///{tmp_path / 'service.db'}"
    engine = make_engine(url)
    upgrade_schema(engine)
    now = dt.datetime.now(dt.UTC)
    write_batch(
        engine,
        [
            (
                "prediction",
                {
                    "id": str(uuid.uuid4()),
                    "model_name": loaded.name,
                    "model_version": "1",
                    "prediction_json": {},
                    "uae_feats": u.tolist(),
                    "bbsd_feats": b.tolist(),
                    "hidden_feats": h.tolist(),
                    "created_on": (now - dt.timedelta(seconds=i)).isoformat(),
                },
            )
            for i, (u, b, h) in enumerate(zip(uae, bbsd, hidden, strict=True))
        ],
    )
    engine.dispose()
    check = run_monitor(packaged.storage, packaged.metadata_file, url, last_n=40)
    assert check.window.size == 40
    assert set(check.results) == {"uae", "bbsd", "hidden"}


# --- pretrained weights: files, cache, mismatches ----------------------------------------------


def test_small_cnn_weights_file_loads_and_mismatch_is_one_clear_error(tmp_path: Path) -> None:
    keras.utils.set_random_seed(7)
    donor = nested_backbone(build_model((SIZE, SIZE), 3, backbone="small_cnn"))
    path = tmp_path / "small_cnn.weights.h5"
    donor.save_weights(path)
    model = build_model((SIZE, SIZE), 5, backbone="small_cnn", weights=str(path))
    net = nested_backbone(model)
    for a, b in zip(net.get_weights(), donor.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(
        not layer.trainable
        for layer in net.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )

    other = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    ).save_weights(other)
    with pytest.raises(WeightsError) as err:
        build_model((SIZE, SIZE), 5, backbone="small_cnn", weights=str(other))
    message = str(err.value)
    assert message.startswith("model.weights:") and str(other) in message
    assert "small_cnn" in message and "expected" in message


def test_application_weights_file_loads(tmp_path: Path) -> None:
    """A `.weights.h5` saved from the no-top network: the air-gapped way."""
    keras.utils.set_random_seed(8)
    donor = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    path = tmp_path / "mnv3s_notop.weights.h5"
    donor.save_weights(path)
    model = build_model((SIZE, SIZE), 3, backbone="mobilenet_v3_small", weights=str(path))
    for a, b in zip(nested_backbone(model).get_weights(), donor.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightsError, match=r"^model\.weights: .*MobileNetV3Large\(include_top"):
        build_model((SIZE, SIZE), 3, backbone="mobilenet_v3_large", weights=str(path))


def test_imagenet_weights_come_from_the_cache_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`imagenet` resolves Keras' own no-top file in CVOPS_WEIGHTS_DIR/models (legacy .h5, as
    Keras publishes it), hash-checked; a missing or corrupt file is one error saying where."""
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(9)
    donor = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    family = backbones.FAMILIES["mobilenet_v3_small"]
    cache = tmp_path / "weights"
    (cache / "models").mkdir(parents=True)
    file = cache / "models" / family.weights_file
    with h5py.File(file, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, donor)
    md5 = hashlib.md5(file.read_bytes()).hexdigest()
    monkeypatch.setenv("CVOPS_WEIGHTS_DIR", str(cache))
    cached = dataclasses.replace(family, weights_md5=md5)
    monkeypatch.setitem(backbones.FAMILIES, "mobilenet_v3_small", cached)
    model = build_model((SIZE, SIZE), 3, backbone="mobilenet_v3_small", weights="imagenet")
    for a, b in zip(nested_backbone(model).get_weights(), donor.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError) as err:
        build_model((SIZE, SIZE), 3, backbone="resnet50", weights="imagenet")
    message = str(err.value)
    assert message.startswith("model.weights: imagenet")
    assert (
        str(cache / "models") in message and backbones.FAMILIES["resnet50"].weights_file in message
    )


# --- fine-tuning -------------------------------------------------------------------------------


def test_training_phases() -> None:
    assert training_phases("none", 5, 3, 0.3, 0.1) == [backbones.Phase("train", 5, 1.0, None)]
    warm, tune = training_phases("imagenet", 5, 2, 0.3, 0.1)
    assert (warm.until_epoch, warm.lr_factor, warm.unfreeze_fraction) == (2, 1.0, 0.0)
    assert (tune.until_epoch, tune.lr_factor, tune.unfreeze_fraction) == (5, 0.1, 0.3)
    assert [p.name for p in training_phases("/w.h5", 2, 0, 0.5, 0.1)] == ["finetune"]
    assert [p.name for p in training_phases("imagenet", 2, 5, 0.5, 0.1)] == ["warmup"]


def test_unfreezing_opens_the_top_and_keeps_batchnorm_frozen() -> None:
    model = build_model((SIZE, SIZE), 3, backbone="mobilenet_v3_small")
    net = nested_backbone(model)
    tunable = [
        layer
        for layer in net.layers
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert set_backbone_trainable(model, 0.0) == 0 and not net.trainable_weights
    opened = set_backbone_trainable(model, 0.25)
    assert opened == int(np.ceil(0.25 * len(tunable)))
    assert all(layer.trainable for layer in tunable[-opened:])
    assert not any(layer.trainable for layer in tunable[:-opened])
    assert not any(
        layer.trainable
        for layer in net.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert model.layers[-1].trainable  # the head always trains


def _tiny_dataset(root: Path, n_per_class: int = 4) -> Splits:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for target, name in enumerate(CLASSES):
        folder = root / "ds" / "train" / name
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[..., target] = 255  # a learnable colour cue
            path = folder / f"{i}.png"
            Image.fromarray(pixels).save(path)
            rows.append({"path": str(path), "target": target})
    frame = pd.DataFrame(rows)
    return Splits(train=frame, val=frame.iloc[:0], test=frame)


class Snapshots(keras.callbacks.Callback):
    """The backbone's weights and the optimizer's rate at the end of every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []
        self.lrs: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.weights.append([w.copy() for w in nested_backbone(self.model).get_weights()])
        self.lrs.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def test_pretrained_backbone_warms_up_frozen_then_fine_tunes_its_top(tmp_path: Path) -> None:
    keras.utils.set_random_seed(11)
    donor = nested_backbone(build_model((SIZE, SIZE), 3, backbone="small_cnn"))
    donor_path = tmp_path / "trunk.weights.h5"
    donor.save_weights(donor_path)
    start = donor.get_weights()
    cfg = config(
        tmp_path,
        model_section(backbone="small_cnn", weights=str(donor_path)),
        hparams={"epochs": 3, "batch_size": 4, "init_lr": 0.01},
        finetune={"warmup_epochs": 1, "unfreeze_fraction": 0.5, "lr_factor": 0.1},
    )
    snapshots = Snapshots()
    model, history = fit_model(cfg, _tiny_dataset(tmp_path), callbacks=[snapshots])
    assert len(history["loss"]) == 3 and len(snapshots.weights) == 3
    assert snapshots.lrs == pytest.approx([0.01, 0.001, 0.001])
    net = nested_backbone(model)
    names = [v.path for v in net.weights]
    after_warmup, final = snapshots.weights[0], snapshots.weights[-1]
    for name, a, b in zip(names, start, after_warmup, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} changed while frozen")
    changed = {n for n, a, b in zip(names, start, final, strict=True) if not np.array_equal(a, b)}
    # half of the 6 convs opened: blocks 2 (second conv) and 3; BatchNorm never moves
    assert changed == {n for n in names if n.split("/")[0] in {
        "block2_conv2", "block3_conv1", "block3_conv2"}}, changed  # fmt: skip


def test_weights_none_trains_everything_in_one_phase(tmp_path: Path) -> None:
    cfg = config(tmp_path, model_section(backbone="small_cnn"))
    snapshots = Snapshots()
    model, history = fit_model(cfg, _tiny_dataset(tmp_path), callbacks=[snapshots])
    assert len(history["loss"]) == 2 and snapshots.lrs == pytest.approx([0.01, 0.01])
    net = nested_backbone(model)
    assert all(layer.trainable for layer in net.layers)
    # BatchNorm trained in training mode: its moving means left their zero start
    moving = [v for v in net.weights if v.path.endswith("moving_mean")]
    assert len(moving) == 6
    assert all(np.abs(keras.ops.convert_to_numpy(v)).sum() > 0 for v in moving)


def test_mlflow_logs_a_phased_training_as_one_run(tmp_path: Path) -> None:
    """MLflow refuses to change a param: the fine-tune phase's optimizer gets its own names,
    and the epochs of both phases form one metric curve."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cvops.flows.train_flow import train_model

    donor_path = tmp_path / "trunk.weights.h5"
    nested_backbone(build_model((SIZE, SIZE), 3, backbone="small_cnn")).save_weights(donor_path)
    cfg = config(
        tmp_path,
        model_section(backbone="small_cnn", weights=str(donor_path)),
        hparams={"epochs": 2, "batch_size": 4, "init_lr": 0.01},
        finetune={"warmup_epochs": 1},
    )
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        run_id = client.create_run(mlflow.create_experiment("phases")).info.run_id
        train_model.fn(cfg, _tiny_dataset(tmp_path), run_id)
        params = client.get_run(run_id).data.params
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    finally:
        mlflow.set_tracking_uri(None)
    assert float(params["optimizer_learning_rate"]) == pytest.approx(0.01)
    assert float(params["phase2_optimizer_learning_rate"]) == pytest.approx(0.001)
    assert steps == [0, 1]
