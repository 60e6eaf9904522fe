"""FastAPI app factory: `create_app()` builds one worker's app; state lives on `app.state`."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import threadpoolctl
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cvops import __version__
from cvops.service.limits import BodyLimitMiddleware, BodyTooLarge, body_too_large_handler
from cvops.service.routes import predict_payload, router
from cvops.service.settings import ServiceSettings
from cvops.service.state import ServiceState
from cvops.service.uploads import UPLOAD_SCHEMA, UPLOAD_SCHEMA_NAME
from cvops.service.webui import router as webui_router

log = logging.getLogger(__name__)
UNLOGGED_PATHS = frozenset({"/health_check", "/ready", "/metrics", "/", "/ui"})


class RequestLogMiddleware:
    """Metrics and an `api_log` record for every API call (not probes).

    Plain ASGI (no `BaseHTTPMiddleware` task group and streams per request): it holds the
    response start until the request's records are in the spool, so a 200 that leaves the
    worker is durable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.worker_header = (b"x-cvops-worker", str(os.getpid()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_state = scope.setdefault("state", {})  # what `request.state` writes into

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = time.perf_counter() - started
                status = message["status"]
                message["headers"] = [*message.get("headers", []), self.worker_header]
                route = getattr(scope.get("route"), "path", "unmatched")
                await account(scope, route, request_state, status, elapsed)
            await send(message)

        await self.app(scope, receive, send_logged)


async def account(
    scope: Scope, route: str, request_state: dict[str, Any], status: int, elapsed: float
) -> None:
    """Count the request and spool its records (`api_log`, and the prediction a handler left
    in `request_state`); returns once they are on disk."""
    state: ServiceState = scope["app"].state.svc
    state.metrics.requests.labels(scope["method"], route, str(status)).inc()
    state.metrics.latency.labels(route).observe(elapsed)
    path = scope["path"]
    if path in UNLOGGED_PATHS:
        return
    records = []
    prediction = request_state.get("prediction_record")
    if prediction is not None:
        records.append(("prediction", prediction))
    records.extend(request_state.get("extra_records", []))
    records.append(
        (
            "api_log",
            {
                "id": str(uuid.uuid4()),
                "method": scope["method"],
                "url": path,
                "status": status,
                "message": None,
                "timespan": elapsed,
                "created_on": dt.datetime.now(dt.UTC).isoformat(),
                "prediction_id": prediction["id"] if prediction else None,
            },
        )
    )
    # On disk before the answer leaves: a worker killed after answering loses nothing.
    spooling = time.perf_counter()
    try:
        await state.spool_writes.write(records)
    except Exception:  # the answer is ready; say loudly that its record is not
        log.exception("request records could not be spooled (%s)", path)
    if prediction is not None:
        state.metrics.stages["spool"].observe(time.perf_counter() - spooling)


# the /predict query strings the direct lane answers itself; any other goes through FastAPI
LANE_QUERIES = {b"": True, b"heatmaps=true": True, b"heatmaps=false": False}


class ServiceApp(FastAPI):
    """FastAPI with a direct lane for `POST /predict`, the one hot path.

    Routing, the middleware stack, dependency solving and Request/Response objects cost ~0.7
    ms of CPU per request (issue 14), as much as a fifth of a request's share of the compute
    floor. The lane answers an ordinary upload itself, through the same `predict_payload` and
    `account` as the route; anything else (an error, a body over the limit, another query)
    is handed to the full stack with the body replayed, so every answer but the ordinary
    one comes from the route and its middleware unchanged."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/predict"
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and scope["query_string"] in LANE_QUERIES
            and getattr(self.state, "svc", None) is not None
        ):
            await self._predict_lane(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _predict_lane(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        state: ServiceState = self.state.svc
        content_type = content_length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value
        received: list[Message] = []

        async def replayed() -> Message:
            return received.pop(0) if received else await receive()

        limit = state.settings.max_body_bytes
        if content_length is not None and (
            not content_length.isdigit() or int(content_length) > limit
        ):
            await super().__call__(scope, receive, send)
            return
        size = 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":  # the client left: the stack says so
                await super().__call__(scope, replayed, send)
                return
            size += len(message.get("body", b""))
            if size > limit:
                await super().__call__(scope, replayed, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in received)
        try:
            payload, record = await predict_payload(
                state, body, content_type, LANE_QUERIES[scope["query_string"]]
            )
        except HTTPException:  # a bad upload, no model yet: the route gives the same answer
            await super().__call__(scope, replayed, send)
            return
        scope["app"] = self
        elapsed = time.perf_counter() - started
        await account(scope, "/predict", {"prediction_record": record}, 200, elapsed)
        headers = [
            (b"content-length", str(len(payload)).encode()),
            (b"content-type", b"application/json"),
            (b"x-cvops-worker", str(os.getpid()).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """One readable reason, same shape as every other error: {"detail": "<field>: <msg>"}."""
    assert isinstance(exc, RequestValidationError)
    reasons = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",)) or "request"
        reasons.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(reasons)}, status_code=422)


def model_aware_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi` plus what only the served model knows: a feedback `label` is one of its
    classes (an `enum`, so generated clients know). Built per call from FastAPI's cached static
    schema, never cached itself: PUT /update_model changes the classes."""
    static = app.openapi

    def openapi() -> dict[str, Any]:
        schema = static()
        # /predict reads its multipart body itself (cvops.service.uploads); FastAPI's cached
        # schema gets the body's component once
        schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
            UPLOAD_SCHEMA_NAME, UPLOAD_SCHEMA
        )
        state: ServiceState | None = getattr(app.state, "svc", None)
        model = state.model if state is not None else None
        if model is None:
            return schema
        schema = copy.deepcopy(schema)
        label = schema["components"]["schemas"]["FeedbackRequest"]["properties"]["label"]
        label["enum"] = list(model.classes)
        return schema

    return openapi


def limit_threads(threads: int | None, inter_op_threads: int | None = None) -> None:
    """Fix TensorFlow's thread pools before its runtime starts (after that they are set), and
    keep BLAS to one thread: its matrices here are tiny (preprocessing), where threads only
    spin."""
    threadpoolctl.threadpool_limits(1, user_api="blas")
    inter_op_threads = inter_op_threads or threads
    if threads is None and inter_op_threads is None:
        return
    import tensorflow as tf

    try:
        if threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        if inter_op_threads is not None:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError:  # runtime already initialised (an app created twice in one process)
        log.debug("TensorFlow threads already fixed; %s/%s not applied", threads, inter_op_threads)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limit_threads(settings.tf_threads, settings.tf_inter_op_threads)
        state = ServiceState(settings)
        app.state.svc = state
        await state.start()
        try:
            yield
        finally:
            await state.close()

    app = ServiceApp(
        title="cvops model service",
        version=__version__,
        description="Image classification with Grad-CAM heatmaps and drift embeddings.",
        lifespan=lifespan,
    )
    app.add_middleware(RequestLogMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)  # outermost
    app.add_exception_handler(BodyTooLarge, body_too_large_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(router)
    app.include_router(webui_router)
    app.openapi = model_aware_openapi(app)  # type: ignore[method-assign]
    return app
