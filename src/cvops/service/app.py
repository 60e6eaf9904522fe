"""FastAPI app factory: `create_app()` builds one worker's app; state lives on `app.state`."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from cvops import __version__
from cvops.service.limits import BodyLimitMiddleware, BodyTooLarge, body_too_large_handler
from cvops.service.routes import router
from cvops.service.settings import ServiceSettings
from cvops.service.state import ServiceState
from cvops.service.webui import router as webui_router

log = logging.getLogger(__name__)
UNLOGGED_PATHS = frozenset({"/health_check", "/ready", "/metrics", "/", "/ui"})


class RequestLogMiddleware(BaseHTTPMiddleware):
    """Metrics and an `api_log` record for every API call (not probes)."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        state: ServiceState = request.app.state.svc
        started = time.perf_counter()
        response = await call_next(request)
        elapsed = time.perf_counter() - started
        response.headers["X-Cvops-Worker"] = str(os.getpid())
        route = request.scope.get("route")
        route_name = getattr(route, "path", "unmatched")
        state.metrics.requests.labels(request.method, route_name, str(response.status_code)).inc()
        state.metrics.latency.labels(route_name).observe(elapsed)
        if request.url.path not in UNLOGGED_PATHS:
            records = []
            prediction = getattr(request.state, "prediction_record", None)
            if prediction is not None:
                records.append(("prediction", prediction))
            records.extend(getattr(request.state, "extra_records", []))
            records.append(
                (
                    "api_log",
                    {
                        "id": str(uuid.uuid4()),
                        "method": request.method,
                        "url": str(request.url.path),
                        "status": response.status_code,
                        "message": None,
                        "timespan": elapsed,
                        "created_on": dt.datetime.now(dt.UTC).isoformat(),
                        "prediction_id": prediction["id"] if prediction else None,
                    },
                )
            )
            # On disk before the answer leaves: a worker killed after answering loses nothing.
            try:
                await asyncio.wrap_future(state.recorder.submit(records))
            except Exception:  # the answer is ready; say loudly that its record is not
                log.exception("request records could not be spooled (%s)", request.url.path)
        return response


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
        state: ServiceState | None = getattr(app.state, "svc", None)
        model = state.model if state is not None else None
        if model is None:
            return schema
        schema = copy.deepcopy(schema)
        label = schema["components"]["schemas"]["FeedbackRequest"]["properties"]["label"]
        label["enum"] = list(model.classes)
        return schema

    return openapi


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings)
        app.state.svc = state
        await state.start()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
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
