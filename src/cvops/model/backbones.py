"""Which network classifies: its architecture, preprocessing, weights and fine-tune split.

Every backbone takes the shared [0, 1] input of `preprocess_image` and carries its own
preprocessing as layers, so training and the service keep one preprocessing function. All of
them end in the same head: GlobalAveragePooling2D named `features` (the drift monitor's hidden
embedding; Grad-CAM uses the 4-D tensor it pools) -> classification layer.

- `reference_cnn`: the reference project's CNN, layer for layer (`build.build_model`'s default).
- `small_cnn`: three Conv-BN-ReLU x2 blocks, learns small datasets from scratch.
- `keras.applications` families: the network without its top, nested as one layer.

`model.weights`: `none` (random init, the whole model trains from the start), `imagenet`
(downloaded once into CVOPS_WEIGHTS_DIR/models/, the file Keras itself would fetch) or the path
of a weights file of the backbone alone: for a `keras.applications` family the same no-top file
(`*_notop.h5` / `*_no_top_v2.h5`, e.g. copied from an online machine's cache) or a
`.weights.h5` saved from the backbone built with `include_top=False`; for `small_cnn` one saved
from its nested `small_cnn` layer. `fit_model` fine-tunes pretrained backbones in two phases.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from cvops.config import APPLICATION_BACKBONES, ConfigError

log = logging.getLogger(__name__)

FEATURES_LAYER = "features"  # pooled conv features: the drift monitor's "hidden" embedding
INPUT_NAME = "image"
PREPROCESS_LAYER = "preprocess"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications.resnet50.preprocess_input
# BatchNorm moving statistics when training from scratch: Keras' 0.99 (0.999 in MobileNetV3)
# lags for thousands of steps, so inference-mode outputs stay wrong for a short training (the
# small_cnn on the demo data: validation at chance after 6 epochs, 0.88 with 0.9)
SCRATCH_BN_MOMENTUM = 0.9


@dataclass(frozen=True)
class Family:
    """A `keras.applications` network and where its no-top ImageNet weights come from."""

    constructor: str  # attribute of keras.applications
    preprocessing: str  # "x255": the family rescales [0, 255] itself; "caffe": BGR mean-centred
    weights_file: str
    weights_origin: str
    weights_md5: str  # Keras' own hash of the file (keras/src/applications/<family>.py)


_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications"
FAMILIES: dict[str, Family] = {
    "mobilenet_v3_small": Family(
        "MobileNetV3Small",
        "x255",
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        f"{_KERAS_APPS}/mobilenet_v3/",
        "d3e8ec802a04aa4fc771ee12a9a9b836",
    ),
    "mobilenet_v3_large": Family(
        "MobileNetV3Large",
        "x255",
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        f"{_KERAS_APPS}/mobilenet_v3/",
        "07fb09a5933dd0c8eaafa16978110389",
    ),
    "efficientnet_v2_b0": Family(
        "EfficientNetV2B0",
        "x255",
        "efficientnetv2-b0_notop.h5",
        f"{_KERAS_APPS}/efficientnet_v2/",
        "893217f2bb855e2983157299931e43ff",
    ),
    "resnet50": Family(
        "ResNet50",
        "caffe",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_APPS}/resnet/",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
}
assert tuple(FAMILIES) == APPLICATION_BACKBONES, "config.py and backbones.py disagree"


class WeightsError(ConfigError):
    """`model.weights` cannot be used with this backbone: raised before any training."""


def is_pretrained(weights: str | None) -> bool:
    return weights not in (None, "none")


def weights_dir() -> Path:
    """CVOPS_WEIGHTS_DIR, else <CVOPS_STATE_DIR>/weights (same layout as ~/.keras)."""
    from cvops.settings import get_settings

    return get_settings().resolved_weights_dir


def imagenet_weights(backbone: str) -> Path:
    """The family's no-top ImageNet weights: downloaded once, then found (and hash-checked) in
    the cache. Keras reads KERAS_HOME only at import, so the cache is passed explicitly."""
    family = FAMILIES[backbone]
    cache = weights_dir()
    try:
        return Path(
            keras.utils.get_file(
                family.weights_file,
                family.weights_origin + family.weights_file,
                cache_subdir="models",
                file_hash=family.weights_md5,
                cache_dir=str(cache),
            )
        )
    except Exception as err:
        raise WeightsError(
            f"model.weights: imagenet: cannot get {family.weights_file} for {backbone} into "
            f"{cache / 'models'} ({err}). Without network access copy that file there "
            "(CVOPS_WEIGHTS_DIR) or set model.weights to its path"
        ) from None


def _load_backbone_weights(net: keras.Model, path: Path, backbone: str, how: str) -> None:
    """Load a weights file into the backbone; any mismatch is one error naming what fits."""
    try:
        with warnings.catch_warnings(record=True) as noise:  # one warning per skipped layer
            warnings.simplefilter("always")
            net.load_weights(str(path))
        for item in noise:
            log.debug("Loading %s: %s", path, item.message)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"model.weights: {path} does not fit the {backbone} backbone: expected {how} ({first})"
        ) from None


def _expected_weights(backbone: str) -> str:
    if backbone == "small_cnn":
        return "weights saved from the model's nested small_cnn layer (.weights.h5)"
    family = FAMILIES[backbone]
    return (
        f"the weights of keras.applications.{family.constructor}(include_top=False), e.g. "
        f"{family.weights_file} or a .weights.h5 saved from it"
    )


def _preprocessing(kind: str) -> layers.Layer:
    """[0, 1] RGB -> what the family's weights expect, as one serialisable built-in layer."""
    if kind == "x255":  # MobileNetV3 / EfficientNetV2 rescale [0, 255] inside the network
        return layers.Rescaling(255.0, name=PREPROCESS_LAYER)
    # caffe (ResNet50): x*255, RGB -> BGR, minus the ImageNet mean: a fixed 1x1 convolution
    # (a Lambda would not load in the service's safe mode, a custom layer needs registering)
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for out_channel in range(3):
        kernel[0, 0, 2 - out_channel, out_channel] = 255.0
    conv = layers.Conv2D(3, 1, name=PREPROCESS_LAYER, trainable=False)
    conv.build((None, None, None, 3))
    conv.set_weights([kernel, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
    return conv


def small_cnn(input_size: tuple[int, int]) -> keras.Model:
    """Three Conv-BN-ReLU x2 blocks (32/64/128 filters), max-pooled after the first two,
    ~290k parameters.

    The first two blocks run at full and half resolution before any pooling (the reference
    pools after one conv), BatchNorm lets it train fast from scratch; the last block keeps
    1/4 resolution so Grad-CAM maps stay informative (16x16 at 64x64 input).
    """
    h, w = input_size
    inputs = keras.Input(shape=(h, w, 3), name="small_cnn_input")
    x = inputs
    for block, filters in enumerate((32, 64, 128), start=1):
        for conv in (1, 2):
            x = layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}"
            )(x)
            x = layers.BatchNormalization(
                momentum=SCRATCH_BN_MOMENTUM, name=f"block{block}_bn{conv}"
            )(x)
            x = layers.ReLU(name=f"block{block}_relu{conv}")(x)
        if block < 3:
            x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")


def build_backbone_model(
    backbone: str,
    input_size: tuple[int, int],
    n_classes: int,
    *,
    weights: str | Path | None = "none",
    classification_layer: str = "classify_head",
    activation: str = "softmax",
    dropout: float = 0.2,
) -> keras.Model:
    """Image [0, 1] -> (preprocessing) -> nested backbone -> `features` (GAP) -> head.

    A pretrained backbone is called with training=False and its BatchNorm layers are frozen
    (Keras 3 runs a non-trainable BatchNorm in inference mode; an outer `fit` overrides the
    nested call's training=False, so the freeze is what keeps the ImageNet statistics).
    """
    if backbone == "reference_cnn":
        raise ValueError("reference_cnn is built by cvops.model.build.build_model")
    h, w = input_size
    weights = "none" if weights is None else str(weights)
    pretrained = is_pretrained(weights)
    inputs = keras.Input(shape=(h, w, 3), name=INPUT_NAME)
    if backbone == "small_cnn":
        if weights == "imagenet":
            raise WeightsError("model.weights: small_cnn has no imagenet weights")
        net = small_cnn(input_size)
        x = inputs
    else:
        family = FAMILIES[backbone]
        constructor = getattr(keras.applications, family.constructor)
        net = constructor(include_top=False, weights=None, input_shape=(h, w, 3))
        x = _preprocessing(family.preprocessing)(inputs)
    if pretrained:
        path = imagenet_weights(backbone) if weights == "imagenet" else Path(weights)
        _load_backbone_weights(net, path, backbone, _expected_weights(backbone))
        freeze_batchnorm(net)
        log.info("Backbone %s: weights from %s", backbone, path)
    else:
        for layer in _walk(net):
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
    x = net(x, training=False) if pretrained else net(x)
    x = layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(n_classes, activation=activation, name=classification_layer)(x)
    return keras.Model(inputs, outputs, name=f"cvops_{backbone}")


def freeze_batchnorm(net: keras.Model) -> None:
    for layer in _walk(net):
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


def _walk(net: keras.Model) -> list[layers.Layer]:
    out: list[layers.Layer] = []
    for layer in net.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_walk(layer))
    return out


def nested_backbone(model: keras.Model) -> keras.Model | None:
    """The nested backbone (small_cnn or a keras.applications network), None for the
    reference CNN, whose layers are the model's own."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested[0] if len(nested) == 1 else None


def set_backbone_trainable(model: keras.Model, fraction: float) -> int:
    """Freeze the backbone but its top `fraction` of layers with weights (BatchNorm stays
    frozen throughout: fine-tuning must not replace the pretrained statistics). Returns the
    number of layers unfrozen. The head is always trainable."""
    net = nested_backbone(model)
    if net is None:
        raise ValueError(f"model {model.name} has no nested backbone to fine-tune")
    net.trainable = True  # then freeze per layer: Keras propagates the model's flag
    weighted = [layer for layer in net.layers if layer.weights]
    tunable = [layer for layer in weighted if not isinstance(layer, layers.BatchNormalization)]
    n_open = math.ceil(fraction * len(tunable)) if fraction > 0 else 0
    open_set = {id(layer) for layer in tunable[len(tunable) - n_open :]} if n_open else set()
    for layer in net.layers:
        layer.trainable = id(layer) in open_set
    return n_open


@dataclass(frozen=True)
class Phase:
    """One `fit` call: train until `until_epoch` at init_lr * lr_factor with the backbone's
    top `unfreeze_fraction` trainable (None: every layer trainable, no freezing)."""

    name: str
    until_epoch: int
    lr_factor: float
    unfreeze_fraction: float | None


def training_phases(
    weights: str | None,
    epochs: int,
    warmup_epochs: int,
    unfreeze_fraction: float,
    lr_factor: float,
) -> list[Phase]:
    """Without pretrained weights one phase trains everything. With them: warm-up (backbone
    frozen, head at init_lr) for the first `warmup_epochs` of `epochs`, then fine-tuning
    (top part of the backbone open, lower learning rate) for the rest."""
    if not is_pretrained(weights):
        return [Phase("train", epochs, 1.0, None)]
    warmup = min(warmup_epochs, epochs)
    phases = []
    if warmup:
        phases.append(Phase("warmup", warmup, 1.0, 0.0))
    if epochs > warmup:
        phases.append(Phase("finetune", epochs, lr_factor, unfreeze_fraction))
    else:
        log.warning(
            "train.finetune.warmup_epochs (%d) >= hparams.epochs (%d): the backbone stays frozen",
            warmup_epochs,
            epochs,
        )
    return phases


def cam_source(model: keras.Model) -> keras.KerasTensor | None:
    """The 4-D tensor the `features` pooling layer reads (the backbone's last feature map,
    after its BatchNorm/activation), or None when the model has no such layer."""
    try:
        pooled = model.get_layer(FEATURES_LAYER)
    except ValueError:
        return None
    tensor = pooled.input
    return tensor if len(tensor.shape) == 4 else None
