"""Reading request bodies within a size cap, and decoding JSON and form bodies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ingestor_dev.emulator.errors import ApiError, invalid
from ingestor_dev.emulator.forms import parse_form
from ingestor_dev.emulator.stream_body import decode_json

if TYPE_CHECKING:
    from aiohttp import web

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


def too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"The request body is larger than {limit} bytes.")


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    stream = request.content
    body = bytearray()
    while True:
        chunk = await stream.readany()
        if not chunk:
            return bytes(body)
        body.extend(chunk)
        if len(body) > limit:
            raise too_large(limit)


def require_type(request: web.BaseRequest, expected: str, body: bytes) -> None:
    """A body must come with the expected Content-Type (parameters such as charset are ignored)."""
    if body:
        check_type(request.headers.get("Content-Type", ""), expected, body)


def check_type(given: str, expected: str, body: bytes) -> None:
    """`require_type` for a Content-Type header value already read (`""` when there is none)."""
    if not body:
        return
    if given == expected or given.partition(";")[0].strip().lower() == expected:
        return
    raise ApiError(
        415 if expected == JSON else 400,
        "invalid_content_type",
        f"Content-Type must be {expected}, got {given or 'nothing'}.",
    )


async def json_body(request: web.BaseRequest, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    require_type(request, JSON, body)
    document = decode_json(body) if body.strip() else {}
    if not isinstance(document, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return document


async def form_body(request: web.BaseRequest, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    require_type(request, FORM, body)
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise invalid("The request body is not valid UTF-8.", code=None) from exc
    return parse_form(text)
