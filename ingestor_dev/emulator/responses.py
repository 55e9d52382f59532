"""JSON responses (orjson) and Stripe-shaped error responses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from ingestor_dev.emulator.errors import ApiError

JSON = "application/json"
EMPTY_OBJECT = b"{}"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


_JSON_HEADERS = {"Content-Type": JSON}


def ok_empty() -> web.Response:
    """`200 {}` (headers passed as a mapping: cheaper than aiohttp's `content_type=` setter)."""
    return web.Response(body=EMPTY_OBJECT, headers=_JSON_HEADERS)


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), error.status, error.headers or None)
