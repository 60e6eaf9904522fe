"""The `/predict` upload read straight from the request body.

Why not FastAPI's `UploadFile`: its form machinery (python-multipart's callback parser, a
SpooledTemporaryFile per upload, form validation) cost ~0.3 ms per request through the whole
middleware stack (benchmarks: issue 14), more than decoding the image. The body is already in
memory (bounded by `BodyLimitMiddleware`), so finding the one part is a few `bytes.find` calls.
"""

from __future__ import annotations

from typing import Any

from python_multipart.multipart import parse_options_header

FIELD = "file"
MISSING = (
    f"{FIELD}: Field required (send the image as the `{FIELD}` field of a multipart/form-data "
    "upload)"
)

# OpenAPI of the body, as FastAPI would describe an `UploadFile` field
UPLOAD_SCHEMA_NAME = "Body_predict_predict_post"
UPLOAD_SCHEMA: dict[str, Any] = {
    "title": UPLOAD_SCHEMA_NAME,
    "type": "object",
    "required": [FIELD],
    "properties": {
        FIELD: {
            "title": "File",
            "type": "string",
            "format": "binary",
            "minLength": 1,
            "description": "image (JPEG, PNG, BMP, GIF, WebP, TIFF), not empty",
        }
    },
}
OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"$ref": f"#/components/schemas/{UPLOAD_SCHEMA_NAME}"}
            }
        },
    }
}


class UploadError(ValueError):
    """A body that carries no usable `file` part; the reason is what the client is told."""


def multipart_field(body: bytes, content_type: str | None, field: str = FIELD) -> bytes:
    """The bytes of the multipart/form-data part named `field` (the first one)."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise UploadError(MISSING)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError("malformed multipart body: no boundary in Content-Type")
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    if position < 0:
        raise UploadError(MISSING)
    while True:
        start = position + len(delimiter)
        if body.startswith(b"--", start):  # the closing delimiter
            raise UploadError(MISSING)
        if not body.startswith(b"\r\n", start):
            raise UploadError("malformed multipart body: a boundary is not followed by CRLF")
        headers_end = body.find(b"\r\n\r\n", start + 2)
        if headers_end < 0:
            raise UploadError("malformed multipart body: a part's headers do not end")
        content_start = headers_end + 4
        end = body.find(b"\r\n" + delimiter, content_start)
        if end < 0:
            raise UploadError("malformed multipart body: a part does not end (truncated?)")
        if _part_name(body[start + 2 : headers_end]) == field.encode():
            return body[content_start:end]
        position = end + 2


def _part_name(headers: bytes) -> bytes | None:
    if not headers:  # a part without headers (the delimiter line is followed by a blank one)
        return None
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            _, params = parse_options_header(value.strip())
            return params.get(b"name")
    return None
