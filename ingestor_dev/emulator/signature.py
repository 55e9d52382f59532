"""Webhook signatures exactly as Stripe computes them (pure)."""

from __future__ import annotations

import hashlib
import hmac


def compute_signature(payload: str, secret: str, timestamp: int) -> str:
    """Hex HMAC-SHA256 of `f"{timestamp}.{payload}"` keyed with the endpoint secret."""
    signed = f"{timestamp}.{payload}".encode()
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(payload: str, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` header value: `t=<unix>,v1=<hex>`."""
    return f"t={timestamp},v1={compute_signature(payload, secret, timestamp)}"
