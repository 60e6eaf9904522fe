"""A loaded model: classifier, detectors and the compiled inference step, built once per load.

`LoadedModel` is immutable; the app swaps the whole object on reload, so a request sees one
consistent model from preprocessing to response.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from cvops.model.drift import build_hidden
from cvops.model.gradcam import gradcam_and_extras, gradient_model
from cvops.model.preprocess import decode_image, resize_and_scale, resize_and_scale_matrices
from cvops.storage import (
    MODELS_DIR,
    SERVED_ARTIFACTS,
    CentralStorage,
    ModelMetadata,
    StoragePathError,
)

log = logging.getLogger(__name__)

METADATA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.ya?ml$")


class ModelLoadError(RuntimeError):
    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


InferFn = Callable[[np.ndarray], tuple[np.ndarray, ...]]  # probs, uae, bbsd, hidden, cams
PrepareFn = Callable[[np.ndarray], np.ndarray]  # RGB uint8 (H, W, 3) -> model input (h, w, 3)
# model inputs (batch, h, w, 3) -> probs, uae, bbsd, hidden, cams: the traced step
StepFn = Callable[[tf.Tensor], tuple[tf.Tensor, ...]]
# encoded upload -> (its RGB uint8 pixels, model input, the step's outputs for a batch of one)
UploadInferFn = Callable[[bytes], tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]]


@dataclass(frozen=True)
class LoadedModel:
    metadata_file: str
    metadata: ModelMetadata
    infer: InferFn = field(repr=False)
    loaded_at: float
    prepare: PrepareFn = field(repr=False)
    infer_upload: UploadInferFn | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.metadata.model_name

    @property
    def version(self) -> str:
        return str(self.metadata.version or self.metadata.created_on)

    @property
    def run_id(self) -> str | None:
        """The MLflow run that made the model: with the metadata file, what names it exactly
        (registry versions repeat across registries sharing central storage)."""
        return self.metadata.mlflow_run_id

    @property
    def size(self) -> tuple[int, int]:
        return self.metadata.input_size.h, self.metadata.input_size.w

    @property
    def classes(self) -> list[str]:
        return self.metadata.classes


def check_metadata_name(metadata_file: str, storage: CentralStorage) -> None:
    """Only a plain file name inside central storage models/ (no traversal, no subfolders)."""
    if not METADATA_NAME.fullmatch(metadata_file):  # JSON Schema `$`: no trailing newline
        raise ModelLoadError(
            f"invalid metadata file name {metadata_file!r}: expected <model_name>.yaml", 400
        )
    try:
        storage.check_relative(f"{MODELS_DIR}/{metadata_file}")
    except StoragePathError as err:
        raise ModelLoadError(str(err), 400) from None


def load_model(storage: CentralStorage, metadata_file: str) -> LoadedModel:
    """Load and warm up everything a worker needs to serve `metadata_file`.

    From object storage the artifacts are downloaded once per version into the local cache
    and verified against the SHA-256 in the metadata (one request per load once cached)."""
    check_metadata_name(metadata_file, storage)
    started = time.perf_counter()
    try:
        meta, files = storage.fetch(metadata_file, *SERVED_ARTIFACTS)
        model = keras.models.load_model(files["model_path"], compile=False)
        uae = keras.models.load_model(files["uae_model_path"], compile=False)
        bbsd = keras.models.load_model(files["bbsd_model_path"], compile=False)
        hidden = build_hidden(model, meta.drift_detection.hidden_layer)
    except FileNotFoundError as err:
        if not storage.has_metadata(metadata_file):
            raise ModelLoadError(
                f"no model metadata {metadata_file} in central storage models/", 404
            ) from None
        raise ModelLoadError(f"cannot load model {metadata_file}: {err}", 422) from None
    except Exception as err:  # any broken file must leave the old model serving
        raise ModelLoadError(f"cannot load model {metadata_file}: {err}", 422) from None
    size = (meta.input_size.h, meta.input_size.w)
    step = compile_step(model, uae, bbsd, meta, hidden)
    infer = batch_inference(step, size)
    infer_upload = upload_inference(step, size)
    prepare = compile_preprocess(size)
    log.info(
        "Loaded %s v%s (run %s) from %s in %.2f s",
        meta.model_name,
        meta.version,
        meta.mlflow_run_id,
        metadata_file,
        time.perf_counter() - started,
    )
    return LoadedModel(metadata_file, meta, infer, time.time(), prepare, infer_upload)


def compile_preprocess(size: tuple[int, int]) -> PrepareFn:
    """Training's `resize_and_scale` for one upload: as its matrices (0.15 against 0.6 ms per
    120x90 upload for a TensorFlow call), equal to it within float32 rounding."""

    def prepare(rgb: np.ndarray) -> np.ndarray:
        return resize_and_scale_matrices(rgb, size)

    return prepare


def shared_bbsd_tensor(
    model: keras.Model, bbsd: keras.Model, layer_idx: int, input_size: tuple[int, int]
) -> keras.KerasTensor | None:
    """The classifier's own tensor that the packaged BBSD detector computes, when it provably
    is one (the classifier's weights, its outputs on a probe batch); the step then reads BBSD
    off the Grad-CAM forward pass instead of running the classifier a second time (40% of the
    reference CNN's step). None for a detector made any other way: it keeps its own pass."""
    try:
        tensor = model.layers[layer_idx].output
    except (IndexError, AttributeError, ValueError):
        return None
    own, theirs = model.get_weights(), bbsd.get_weights()
    if len(theirs) > len(own) or not all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(theirs, own, strict=False)
    ):
        return None
    probe = np.random.default_rng(0).random((2, *input_size, 3), dtype=np.float32)
    expected = np.asarray(bbsd(probe, training=False))
    got = np.asarray(keras.Model(model.input, tensor)(probe, training=False))
    if expected.shape != got.shape or not np.allclose(expected, got, rtol=1e-5, atol=1e-6):
        return None
    return tensor


def compile_inference(
    model: keras.Model,
    uae: keras.Model,
    bbsd: keras.Model,
    meta: ModelMetadata,
    hidden: keras.Model | None = None,
) -> InferFn:
    """`compile_step` for NumPy batches, traced."""
    size = (meta.input_size.h, meta.input_size.w)
    return batch_inference(compile_step(model, uae, bbsd, meta, hidden), size)


def compile_step(
    model: keras.Model,
    uae: keras.Model,
    bbsd: keras.Model,
    meta: ModelMetadata,
    hidden: keras.Model | None = None,
) -> StepFn:
    """One step, a `tf.function`: probabilities + Grad-CAM, UAE, BBSD and (when the model has
    the layer) hidden features for a batch; without the layer the hidden features are
    (batch, 0). One forward pass through the classifier serves Grad-CAM, the hidden features
    and BBSD."""
    h, w = meta.input_size.h, meta.input_size.w
    shared = shared_bbsd_tensor(model, bbsd, meta.drift_detection.bbsd_layer_idx, (h, w))
    bbsd_is_probs = shared is not None and shared is model.outputs[0]
    extras = [hidden.output] if hidden is not None else []
    if shared is not None and not bbsd_is_probs:
        extras.append(shared)
    grad_model = gradient_model(model, tuple(extras))
    has_hidden = hidden is not None
    log.info("BBSD %s", "from the classifier's forward pass" if shared is not None else "own pass")

    @tf.function(input_signature=[tf.TensorSpec((None, h, w, 3), tf.float32)])
    def step(images: tf.Tensor) -> tuple[tf.Tensor, ...]:
        probs, cams, outputs = gradcam_and_extras(grad_model, images)
        feats = outputs[0] if has_hidden else tf.zeros((tf.shape(images)[0], 0), tf.float32)
        if bbsd_is_probs:
            bbsd_feats = probs
        elif shared is not None:
            bbsd_feats = outputs[-1]
        else:
            bbsd_feats = bbsd(images, training=False)
        return probs, uae(images, training=False), bbsd_feats, feats, cams

    return step


def batch_inference(step: StepFn, size: tuple[int, int]) -> InferFn:
    def infer(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(t.numpy() for t in step(tf.convert_to_tensor(batch)))

    infer(np.zeros((1, *size, 3), np.float32))  # trace now, not on the first request
    return infer


def upload_inference(step: StepFn, size: tuple[int, int]) -> UploadInferFn:
    """One upload from its encoded bytes to the step's outputs in one TensorFlow call:
    training's own decode and resize (`preprocess_image`'s parts) inside the compiled graph.

    For a request on its own (issue 14). Called eagerly, the decode, the resize and the step
    are three dispatches whose Python and TensorFlow paths run cold between requests: 5.6
    against 5.2 ms here for a 120x90 JPEG, 4 ms sleeps between calls. Batches keep `step`:
    their uploads differ in size. Raises `tf.errors.OpError` for bytes TensorFlow cannot
    decode."""

    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
    def decode_and_step(contents: tf.Tensor) -> tuple[tf.Tensor, ...]:
        image = decode_image(contents)
        x = resize_and_scale(image, size)
        return (image, x, *step(x[None]))

    # its one graph, called directly with the bytes: the `tf.function`'s own call (argument
    # binding, its cache of traces) and `tf.constant` cost about 0.2 ms more, run cold
    concrete = decode_and_step.get_concrete_function()

    def infer_upload(data: bytes) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        image, x, *outputs = concrete(data)
        return image.numpy(), x.numpy(), tuple(t.numpy() for t in outputs)

    infer_upload(tf.io.encode_png(tf.zeros((*size, 3), tf.uint8)).numpy())  # trace now
    return infer_upload
