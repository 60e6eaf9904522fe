"""The /predict upload read from the raw body: every well-formed multipart body a client library
sends gives the same bytes FastAPI's form parser would, and a bad one a clear 422 reason."""

from __future__ import annotations

import httpx
import pytest

from cvops.service.uploads import MISSING, UploadError, multipart_field

IMAGE = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"  # bytes that look like structure


def encoded(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/predict", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_the_file_part_is_returned_byte_for_byte() -> None:
    body, content_type = encoded({"file": ("a.jpg", IMAGE, "image/jpeg")})
    assert multipart_field(body, content_type) == IMAGE


def test_other_fields_before_and_after_are_skipped() -> None:
    body, content_type = encoded(
        {"other": ("b.bin", b"xx"), "file": ("a.png", IMAGE)}, data={"note": "hello"}
    )
    assert multipart_field(body, content_type) == IMAGE


def test_unquoted_names_and_an_empty_file_are_read() -> None:
    body = b"--b\r\nContent-Disposition: form-data; name=file; filename=x.png\r\n\r\n\r\n--b--\r\n"
    assert multipart_field(body, "multipart/form-data; boundary=b") == b""


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{}", "application/json", MISSING),
        (b"", None, MISSING),
        (b"--b\r\n\r\n", "multipart/form-data", "no boundary"),
        (b"--b--\r\n", "multipart/form-data; boundary=b", MISSING),
        (
            b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            MISSING,
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\ntruncated',
            "multipart/form-data; boundary=b",
            "does not end",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"',
            "multipart/form-data; boundary=b",
            "headers do not end",
        ),
        (b"--bXYZ", "multipart/form-data; boundary=b", "not followed by CRLF"),
    ],
)
def test_bad_bodies_name_the_problem(body: bytes, content_type: str | None, reason: str) -> None:
    with pytest.raises(UploadError, match=reason.split(" (")[0].replace("`", ".")):
        multipart_field(body, content_type)


def test_predict_without_a_file_is_a_422_with_the_reason(client) -> None:
    for answer in (
        client.post("/predict", data={"note": "no image"}),
        client.post("/predict", json={"file": "x"}),
        client.post("/predict", files={"image": ("x.png", b"abc")}),
    ):
        assert answer.status_code == 422
        assert answer.json()["detail"].startswith("file: Field required")
