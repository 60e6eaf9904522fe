"""HTTP routes, thin over ServiceState (reference-compatible paths and keys)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hmac
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import cv2
import numpy as np
import tensorflow as tf
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image

from cvops.model.gradcam import blend, colorize_bgr, heatmap_to_image
from cvops.service.images import (
    TF_DECODABLE,
    BadImage,
    fit_within,
    open_upload,
    png_base64,
    read_upload,
)
from cvops.service.model_store import METADATA_NAME, LoadedModel, ModelLoadError
from cvops.service.recording import feedback_record
from cvops.service.schemas import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    PredictResponse,
    UpdateModelResponse,
)
from cvops.service.state import (
    InferenceItem,
    InferenceResult,
    ModelStateUnavailable,
    ServiceState,
)
from cvops.service.uploads import OPENAPI_BODY, UploadError, multipart_field

router = APIRouter()
T = TypeVar("T")
INLINE_MAX_PIXELS = 500_000  # an 800x600 upload: decoded and drawn in a few ms
bearer = HTTPBearer(auto_error=False)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 503)
}


async def get_state(request: Request) -> ServiceState:
    return request.app.state.svc


State = Annotated[ServiceState, Depends(get_state)]


def require_admin(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    token = state.settings.admin_token
    if token is None:
        if state.settings.allow_unauthenticated_admin:
            return
        raise HTTPException(403, "admin endpoints are disabled: set CVOPS_SERVICE_ADMIN_TOKEN")
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


@router.get("/health_check", response_model=Health, tags=["health"])
async def health_check(state: State) -> Health:
    """Liveness: the process answers (a model may not be loaded yet; see /ready)."""
    model = state.model
    return Health(
        status="ok",
        model_loaded=model is not None,
        model_name=model.name if model else None,
        model_version=model.version if model else None,
        metadata_file=model.metadata_file if model else None,
        mlflow_run_id=model.run_id if model else None,
        instance_id=state.settings.instance_id,
        replica=state.replica_id,
        generation=state.generation,
    )


@router.get("/ready", response_model=Health, responses=ERRORS, tags=["health"])
async def ready(state: State) -> Health:
    """Readiness: 200 once the deployment's model is loaded; 503 with the reason before, and
    when this replica cannot load the model the others serve (it still answers /predict with
    its old one, but a load balancer should take it out)."""
    reason = state.not_ready_reason()
    if reason is not None:
        raise HTTPException(503, reason)
    return await health_check(state)


def _prepare(
    data: bytes, opened: Image.Image, model: LoadedModel, max_pixels: int, heatmap_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image the heatmaps are drawn on (BGR), model input), both from one decode of the upload:
    the model input through the shared `resize_and_scale`, the picture at most `heatmap_side` on
    its longest side. The full decode is dropped here, before the request waits for its batch."""
    rgb, _ = read_upload(data, max_pixels, keep_side(model, heatmap_side), opened)
    return heatmap_picture(rgb, heatmap_side), model.prepare(rgb)


def keep_side(model: LoadedModel, heatmap_side: int) -> int:
    """The longest side an upload's decode must keep: for the heatmaps and the model input."""
    return max(heatmap_side, *model.size)


def heatmap_picture(rgb: np.ndarray, heatmap_side: int) -> np.ndarray:
    """The image the heatmaps are drawn on: at most `heatmap_side` on its longest side, BGR."""
    return cv2.cvtColor(fit_within(rgb, heatmap_side), cv2.COLOR_RGB2BGR)


async def _infer_alone(
    state: ServiceState, model: LoadedModel, data: bytes, opened: Image.Image
) -> tuple[np.ndarray, np.ndarray, InferenceResult] | None:
    """(heatmap picture (BGR), model input, result) of a request on its own: its upload decoded,
    resized and inferred in one TensorFlow call on the event loop
    (`cvops.service.model_store.upload_inference`, where the batcher would run a lone item's
    call). None where that does not apply: other requests in flight, a slow model, an upload
    for `_prepare` (a format TensorFlow does not read, one decoded reduced, a large one) or
    bytes TensorFlow refuses (`_prepare` then decodes them, with its fallbacks and reasons)."""
    width, height = opened.size
    heatmap_side = state.settings.heatmap_max_side
    infer_upload = model.infer_upload
    if (
        infer_upload is None
        or opened.format not in TF_DECODABLE
        or max(width, height) >= 2 * keep_side(model, heatmap_side)  # `read_upload` reduces
        or width * height > INLINE_MAX_PIXELS
        or not state.batcher.inline_allowed()  # others in flight already: no need to look
    ):
        return None
    # one turn of the event loop first: requests that arrived meanwhile are then in flight too,
    # as when a lone item reaches the batcher (without it, under load each request found
    # none other in flight and they all went alone, one by one: no batches)
    await asyncio.sleep(0)
    try:
        called = state.batcher.run_alone(lambda: infer_upload(data))
    except tf.errors.OpError:
        return None
    if called is None:
        return None
    (rgb, x, outputs), seconds = called
    return heatmap_picture(rgb, heatmap_side), x, InferenceResult.of_row(outputs, 0, seconds)


async def _run_sized(pixels: int, fn: Callable[..., T], *args: Any) -> T:
    """Small images on the event loop, large ones in a thread. A thread hop costs more than
    decoding or drawing a small image, and the GIL serialises the Python part anyway; a large
    one would hold up every other request of the worker (its probes too)."""
    if pixels <= INLINE_MAX_PIXELS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _render(bgr: np.ndarray, result: InferenceResult, png_level: int) -> tuple[str, str]:
    """(heatmap, overlay) as base64 PNGs, drawn in OpenCV's channel order end to end."""
    height, width = bgr.shape[:2]
    heat = heatmap_to_image(result.cam, width, height)
    coloured = colorize_bgr(heat)
    return (
        png_base64(coloured, png_level, bgr=True),
        png_base64(blend(bgr, heat, coloured), png_level, bgr=True),
    )


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    tags=["predict"],
    openapi_extra=OPENAPI_BODY,
)
@router.post("/predict/", response_model=PredictResponse, include_in_schema=False)
async def predict(
    request: Request,
    state: State,
    heatmaps: Annotated[
        bool,
        Query(
            description="false: no heatmap images in the answer (`raw_hm_img` and "
            "`overlaid_img` are null), for clients that only need the class; cheaper"
        ),
    ] = True,
) -> Response:
    """Class probabilities, Grad-CAM heatmap, UAE and BBSD features for one image."""
    payload, record = await predict_payload(
        state, await request.body(), request.headers.get("content-type"), heatmaps
    )
    request.state.prediction_record = record
    return Response(payload, media_type="application/json")


async def predict_payload(
    state: ServiceState, body: bytes, content_type: str | None, heatmaps: bool
) -> tuple[bytes, dict[str, Any]]:
    """(JSON answer, `predictions` record) of one upload: the whole of `/predict` but the HTTP
    around it, shared by the route and the direct lane of `cvops.service.app.ServiceApp`.
    Raises HTTPException (4xx, 503) before any inference, never after."""
    state.predictions_in_flight += 1  # a lone one may run its step on the event loop
    try:
        return await _predict_payload(state, body, content_type, heatmaps)
    finally:
        state.predictions_in_flight -= 1


async def _predict_payload(
    state: ServiceState, body: bytes, content_type: str | None, heatmaps: bool
) -> tuple[bytes, dict[str, Any]]:
    model = state.model
    if model is None:
        raise HTTPException(503, "no model loaded yet")
    started = time.perf_counter()
    try:
        data = multipart_field(body, content_type)
    except UploadError as err:
        raise HTTPException(422, str(err)) from None
    try:
        opened = open_upload(data, state.settings.max_image_pixels)  # the header: cheap
        width, height = opened.size
        alone = await _infer_alone(state, model, data, opened)
        if alone is None:
            bgr, x = await _run_sized(
                width * height,
                _prepare,
                data,
                opened,
                model,
                state.settings.max_image_pixels,
                state.settings.heatmap_max_side,
            )
    except BadImage as err:
        raise HTTPException(err.status, err.reason) from None
    if alone is None:
        prepared = time.perf_counter()
        result = await state.batcher.submit(InferenceItem(model, x))
        inferred = time.perf_counter()
    else:  # decoded and resized in the model call: the rest of the time is preprocessing
        bgr, x, result = alone
        inferred = time.perf_counter()
        prepared = inferred - result.step_s
    png_level = state.settings.png_compression
    raw_hm, overlaid = (
        await _run_sized(bgr.shape[0] * bgr.shape[1], _render, bgr, result, png_level)
        if heatmaps
        else (None, None)
    )
    rendered = time.perf_counter()
    probs = {c: float(p) for c, p in zip(model.classes, result.probs, strict=True)}
    predicted = max(probs, key=probs.__getitem__)
    prediction_id = str(uuid.uuid4())
    response = PredictResponse(
        model_name=model.name,
        model_version=model.version,
        prediction=probs,
        predicted_class=predicted,
        uae_feats=result.uae.astype(float).tolist(),
        bbsd_feats=result.bbsd.astype(float).tolist(),
        hidden_feats=result.hidden.astype(float).tolist() if result.hidden.size else None,
        raw_hm_img=raw_hm,
        overlaid_img=overlaid,
        prediction_id=prediction_id,
        timings_ms={
            "preprocess": 1000 * (prepared - started),
            "inference": 1000 * (inferred - prepared),
            "render": 1000 * (rendered - inferred),
        },
    )
    state.metrics.predictions.labels(model.name, predicted).inc()
    stages = state.metrics.stages
    stages["preprocess"].observe(prepared - started)
    stages["queue"].observe(max(0.0, inferred - prepared - result.step_s))
    stages["inference"].observe(result.step_s)
    if heatmaps:
        stages["render"].observe(rendered - inferred)
    # image properties: measured by the spool flusher, off the request path
    state.recorder.keep_input(prediction_id, x, width, height)
    stored = data if state.settings.keeps_images else None  # central storage: the flusher
    # serialised once by pydantic: FastAPI would validate the model again, then dump it
    return response.model_dump_json().encode(), prediction_record(response, stored)


def prediction_record(response: PredictResponse, data: bytes | None) -> dict[str, Any]:
    """The `predictions` row; images only when the service is set to store them."""
    return {
        "id": response.prediction_id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "input_img": base64.b64encode(data).decode("ascii") if data is not None else None,
        "raw_hm_img": response.raw_hm_img if data is not None else None,
        "overlaid_img": response.overlaid_img if data is not None else None,
        "prediction_json": {
            "prediction": response.prediction,
            "predicted_class": response.predicted_class,
        },
        "uae_feats": response.uae_feats,
        "bbsd_feats": response.bbsd_feats,
        "hidden_feats": response.hidden_feats,
        "created_on": dt.datetime.now(dt.UTC).isoformat(),
    }


@router.put(
    "/update_model/{metadata_file}",
    response_model=UpdateModelResponse,
    responses=ERRORS,
    dependencies=[Depends(require_admin)],
    tags=["admin"],
)
async def update_model(
    metadata_file: Annotated[
        str,
        Path(
            description="`<model_name>.yaml` in central storage models/; other names are a 400",
            json_schema_extra={"pattern": METADATA_NAME.pattern},  # checked by load_model
        ),
    ],
    state: State,
) -> UpdateModelResponse:
    """Serve another packaged model (a metadata file in central storage `models/`) in every
    replica of the deployment, on every host. Loaded here first (a failed load keeps the old
    model everywhere), then returns once every live replica serves it, or names those that do
    not within the wait (`replicas_pending`, `replicas_failed`). 503 when the model state
    database is unreachable: nothing changes then."""
    try:
        result = await state.update_model(metadata_file)
    except ModelLoadError as err:
        raise HTTPException(err.status, err.reason) from None
    except ModelStateUnavailable as err:
        raise HTTPException(503, str(err)) from None
    return UpdateModelResponse(message="Success", **result)  # type: ignore[arg-type]


@router.post(
    "/feedback/{prediction_id}",
    response_model=FeedbackResponse,
    responses=ERRORS,
    tags=["predict"],
)
async def feedback(
    prediction_id: uuid.UUID, body: FeedbackRequest, request: Request, state: State
) -> FeedbackResponse:
    """Store the true label of a prediction (one per prediction: sending again replaces it);
    the monitor reports live accuracy from these. 404 when the prediction database says no
    such prediction exists; accepted unchecked while it is unreachable."""
    model = state.model
    if model is not None and body.label not in model.classes:
        raise HTTPException(422, f"label {body.label!r} is not one of {model.classes}")
    known = await asyncio.to_thread(state.recorder.prediction_known, str(prediction_id))
    if known is False:
        raise HTTPException(404, f"no prediction with id {prediction_id}")
    request.state.extra_records = [("feedback", feedback_record(str(prediction_id), body.label))]
    return FeedbackResponse(message="Success", prediction_id=str(prediction_id), label=body.label)


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus metrics of all workers."""
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
