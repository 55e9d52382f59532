"""Meter event sessions: short-lived tokens for the stream, expiring and revocable."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from ingestor_dev.emulator.timefmt import format_rfc3339


@dataclass(slots=True)
class Session:
    id: str
    token: str
    api_key: str
    livemode: bool
    created: float
    expires_at: float
    revoked: bool = False

    def valid(self, now: float, revoke_after: float | None) -> bool:
        if self.revoked or now >= self.expires_at:
            return False
        return revoke_after is None or now < self.created + revoke_after

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "v2.billing.meter_event_session",
            "authentication_token": self.token,
            "created": format_rfc3339(self.created),
            "expires_at": format_rfc3339(self.expires_at),
            "livemode": self.livemode,
        }


class SessionStore:
    def __init__(self) -> None:
        self.by_token: dict[str, Session] = {}
        self.created = 0

    def create(self, session_id: str, api_key: str, livemode: bool, now: float, ttl: float) -> Session:
        mode = "live" if livemode else "test"
        token = f"ek_{mode}_{secrets.token_urlsafe(32)}"
        session = Session(session_id, token, api_key, livemode, now, now + ttl)
        self.by_token[token] = session
        self.created += 1
        return session

    def resolve(self, token: str, now: float, revoke_after: float | None) -> Session | None:
        """The live session for a token; None when unknown, expired or revoked."""
        session = self.by_token.get(token)
        if session is None or not session.valid(now, revoke_after):
            return None
        return session

    def revoke(self, token: str | None = None) -> int:
        """Revoke one session (by token) or all; returns how many were live and are now revoked."""
        targets = (
            list(self.by_token.values()) if token is None else [self.by_token[token]] if token in self.by_token else []
        )
        fresh = [session for session in targets if not session.revoked]
        for session in fresh:
            session.revoked = True
        return len(fresh)

    def prune(self, now: float) -> None:
        """Forget sessions expired more than an hour ago (their tokens answer 401 either way)."""
        stale = [token for token, session in self.by_token.items() if session.expires_at < now - 3600]
        for token in stale:
            del self.by_token[token]
