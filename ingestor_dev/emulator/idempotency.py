"""Idempotency keys, as Stripe honours them (pure).

A POST with an `Idempotency-Key` that was already used by the same API key within 24 hours gets the
first answer again, status and body, with `Idempotent-Replayed: true`, and nothing is executed twice.
The same key with different parameters is refused: 400 `idempotency_error`. Answers are saved once the
endpoint started executing (its parameters had the right shape); a request refused before that saves
nothing, as Stripe documents.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from ingestor_dev.emulator.errors import ApiError
from ingestor_dev.emulator.limits import DEDUP_WINDOW_S

#: How long Stripe keeps an idempotency key (24 hours, documented).
KEY_TTL_S: Final = DEDUP_WINDOW_S
REPLAYED_HEADER: Final = "Idempotent-Replayed"
#: (status, body) of an answer
Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Saved:
    fingerprint: bytes
    status: int
    body: dict[str, Any]
    created: float


@dataclass(slots=True)
class IdempotencyStore:
    saved: dict[tuple[str, str], Saved] = field(default_factory=dict)
    order: deque[tuple[float, tuple[str, str]]] = field(default_factory=deque)

    def lookup(self, api_key: str, key: str, params: dict[str, Any], now: float) -> Saved | None:
        """The saved answer for this key, None when the key is new; 400 when it came with other parameters."""
        self._expire(now)
        saved = self.saved.get((api_key, key))
        if saved is not None and saved.fingerprint != fingerprint(params):
            raise ApiError(
                400,
                None,
                "Keys for idempotent requests can only be used with the same parameters they were first used "
                f"with. Try using a key other than '{key}' if you meant to execute a different request.",
                type="idempotency_error",
            )
        return saved

    def save(self, api_key: str, key: str, params: dict[str, Any], answer: Answer, now: float) -> None:
        status, body = answer
        self.saved[api_key, key] = Saved(fingerprint(params), status, body, now)
        self.order.append((now, (api_key, key)))

    def _expire(self, now: float) -> None:
        while self.order and self.order[0][0] <= now - KEY_TTL_S:
            _, entry = self.order.popleft()
            saved = self.saved.get(entry)
            if saved is not None and saved.created <= now - KEY_TTL_S:
                del self.saved[entry]


def fingerprint(params: dict[str, Any]) -> bytes:
    return orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
