"""API keys and the Authorization header (pure)."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ingestor_dev.emulator.errors import unauthorized

_KEY = re.compile(r"(?:sk|rk)_(test|live)_[A-Za-z0-9]+")


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: str
    livemode: bool


def credential(header: str | None, allow_basic: bool) -> str | None:
    """The key or token in `Authorization: Bearer x` (or `Basic base64(x:)` when allowed)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip() or None
    if scheme == "basic" and allow_basic:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None


def check_key(header: str | None, known: frozenset[str], allow_basic: bool = False) -> ApiKey:
    """The secret key of a request, or a Stripe-shaped 401."""
    key = credential(header, allow_basic)
    if key is None:
        raise unauthorized(
            "You did not provide an API key. You need to provide your API key in the Authorization header, "
            "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
        )
    match = _KEY.fullmatch(key)
    if match is None or (known and key not in known):
        raise unauthorized(f"Invalid API Key provided: {redact(key)}")
    return ApiKey(key, match.group(1) == "live")


def redact(key: str) -> str:
    return f"{key[:8]}****{key[-4:]}" if len(key) > 12 else "****"


def is_well_formed(key: str) -> bool:
    return _KEY.fullmatch(key) is not None
