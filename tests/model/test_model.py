import keras
import numpy as np
import pytest

from cvops.config import AugmentationConfig
from cvops.model.build import LAST_CONV_LAYER, build_model
from cvops.model.drift import build_bbsd, build_hidden, build_uae, features, reference_frame
from cvops.model.pipeline import build_augmenter, make_dataset


def test_reference_cnn_architecture() -> None:
    model = build_model((50, 50), 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "InputLayer",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "Conv2D",
        "GlobalAveragePooling2D",
        "Dense",
        "Dense",
        "Dense",
    ]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [128, 128, 64]
    assert all(c.kernel_size == (3, 3) for c in convs)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [64, 32, 10]
    assert model.layers[-1].name == "classify_head"
    assert model.get_layer(LAST_CONV_LAYER) is convs[-1]
    assert model.output_shape == (None, 10)


def test_input_size_from_config_and_softmax_output() -> None:
    model = build_model((40, 64), 3, classification_layer="head")
    x = np.random.default_rng(0).random((2, 40, 64, 3), dtype=np.float32)
    probs = model(x).numpy()
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("head") is model.layers[-1]


def test_uae_is_seeded_and_32d() -> None:
    x = np.random.default_rng(0).random((4, 50, 50, 3), dtype=np.float32)
    a, b, c = (build_uae((50, 50), 32, seed=s)(x).numpy() for s in (7, 7, 8))
    assert a.shape == (4, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    strides = [layer.strides for layer in build_uae((50, 50)).layers if "conv" in layer.name]
    assert strides == [(2, 2)] * 3


def test_bbsd_is_classifier_softmax() -> None:
    model = build_model((50, 50), 5)
    bbsd = build_bbsd(model, -1)
    x = np.random.default_rng(0).random((3, 50, 50, 3), dtype=np.float32)
    np.testing.assert_allclose(bbsd(x).numpy(), model(x).numpy(), rtol=1e-6)
    assert build_bbsd(model, -2)(x).shape == (3, 32)


def test_hidden_features_are_the_pooled_conv_layer() -> None:
    import tensorflow as tf

    model = build_model((50, 50), 5)
    hidden = build_hidden(model, "features")
    assert hidden is not None
    x = np.random.default_rng(1).random((4, 50, 50, 3), dtype=np.float32)
    pooled = model.get_layer("last_conv").output
    conv = keras.Model(model.input, pooled)(x).numpy()
    np.testing.assert_allclose(hidden(x).numpy(), conv.mean((1, 2)), rtol=1e-5, atol=1e-6)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(4))).batch(3)
    np.testing.assert_allclose(features(hidden, ds), hidden(x).numpy(), rtol=1e-5, atol=1e-6)
    # off, or a model built before the layer was named: no hidden embedding
    assert build_hidden(model, None) is None
    assert build_hidden(model, "no_such_layer") is None


def test_reference_frame_columns() -> None:
    frame = reference_frame(
        np.ones((3, 32)), np.full((3, 5), 0.2), np.array([0, 4, 1]), ["a", "b", "c", "d", "e"]
    )
    assert list(frame.columns) == ["uae_feats", "bbsd_feats", "label"]
    assert frame["label"].tolist() == ["a", "e", "b"]
    assert len(frame["uae_feats"][0]) == 32 and len(frame["bbsd_feats"][0]) == 5
    with_hidden = reference_frame(
        np.ones((3, 32)), np.full((3, 5), 0.2), np.array([0, 4, 1]), list("abcde"), np.ones((3, 64))
    )
    assert list(with_hidden.columns) == ["uae_feats", "bbsd_feats", "label", "hidden_feats"]
    assert len(with_hidden["hidden_feats"][0]) == 64


@pytest.fixture()
def image_paths(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_pipeline_is_deterministic_under_seed(image_paths) -> None:
    def batches(seed: int) -> list[np.ndarray]:
        ds = make_dataset(
            image_paths,
            list(range(12)),
            (50, 50),
            5,
            shuffle=True,
            augment=AugmentationConfig(),
            seed=seed,
        )
        return [images.numpy() for _ in range(2) for images, _ in ds]

    first, again, other = batches(3), batches(3), batches(4)
    assert [b.shape for b in first] == [(5, 50, 50, 3), (5, 50, 50, 3), (2, 50, 50, 3)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_augmentation_changes_images_but_not_eval(image_paths) -> None:
    plain = next(iter(make_dataset(image_paths, [0] * 12, (50, 50), 12)))[0].numpy()
    augmented = next(
        iter(
            make_dataset(image_paths, [0] * 12, (50, 50), 12, augment=AugmentationConfig(), seed=1)
        )
    )[0].numpy()
    again = next(iter(make_dataset(image_paths, [0] * 12, (50, 50), 12)))[0].numpy()
    assert not np.allclose(plain, augmented)
    np.testing.assert_array_equal(plain, again)
    assert build_augmenter(AugmentationConfig(enabled=False), 0) is None
