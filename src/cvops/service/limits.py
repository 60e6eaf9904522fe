"""Request body limit that also holds for chunked uploads (no Content-Length to trust)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body too large (limit {limit} bytes)")
        self.limit = limit


class BodyLimitMiddleware:
    """Counts body bytes as they arrive and stops reading past `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large_response(self.max_bytes)(scope, receive, send)
            return
        seen = 0
        exceeded = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def guarded_send(message: Message) -> None:
            # Whatever the app made of the aborted read (FastAPI turns it into a generic 400),
            # the client gets the real reason.
            nonlocal replaced
            if exceeded:
                if not replaced:
                    replaced = True
                    await too_large_response(self.max_bytes)(scope, receive, send)
                return
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def too_large_response(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body too large (limit {limit} bytes)"}, 413)


async def body_too_large_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return too_large_response(exc.limit)
