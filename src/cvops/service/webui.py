"""Web UI: one page to upload an image and see the prediction and heatmap (placeholder)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
