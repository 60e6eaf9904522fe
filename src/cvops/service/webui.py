"""Web UI: one self-contained page to upload an image and see the prediction and heatmap.

Unlike the reference UI (one global "last image" shared by every user), the page is static and
keeps each result in the browser that asked for it: the server stores nothing per user.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

# Inline script and style only, no external origin; images come back as data: URLs and the
# input preview as a blob: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'self'"
)


@cache
def page() -> str:
    """The page's HTML (package data, read once per worker)."""
    return resources.files("cvops.service").joinpath("static/index.html").read_text("utf-8")


@router.get("/", response_class=HTMLResponse)
@router.get("/ui", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(
        page(),
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
        },
    )
