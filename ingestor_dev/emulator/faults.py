"""Fault injection: what to break, and the seeded decision for one request (pure core).

Each request draws one uniform number and falls into at most one outcome band, in this order:
5xx with `Stripe-Should-Retry: true`, 5xx with `false`, 5xx without the header, 429 from a rate
limiter (with `Stripe-Rate-Limited-Reason`), 429 `lock_timeout` (no reason header), connection reset
before processing (nothing counted), connection reset after processing (events counted, no
response), slow response (events counted, then the answer is held back `slow_response_s`). Latency
(`latency_s` plus uniform `[0, latency_jitter_s]`) is added to every faulted-scope request on top.
The random generator is re-seeded from the seed whenever the faults are set, so a test that sets
faults and then sends N requests sees the same outcomes on every run.

`scope` says which requests are faulted: `stream` (the meter event stream), `all` (every Stripe
endpoint), or `session` (session creation only: stream requests with a valid token still succeed
while no new token can be had, e.g. to fail rotations, or recoveries after a revocation).
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

Scope = Literal["stream", "all", "session"]


class Outcome(Enum):
    NONE = "none"
    ERROR_RETRY_TRUE = "error_retry_true"
    ERROR_RETRY_FALSE = "error_retry_false"
    ERROR_NO_HEADER = "error_no_header"
    RATE_LIMIT = "rate_limit"
    LOCK_TIMEOUT = "lock_timeout"
    RESET_BEFORE = "reset_before"
    RESET_AFTER = "reset_after"
    SLOW = "slow"


@dataclass(frozen=True, slots=True)
class Faults:
    """Fractions are probabilities per request in `[0, 1]`; their sum must not exceed 1."""

    error_retry_true: float = 0.0
    error_retry_false: float = 0.0
    error_no_header: float = 0.0
    error_status: int = 500
    rate_limit: float = 0.0
    rate_limit_reason: str = "global-rate"
    lock_timeout: float = 0.0
    reset_before: float = 0.0
    reset_after: float = 0.0
    slow_response: float = 0.0
    slow_response_s: float = 0.0
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    revoke_sessions_after_s: float | None = None
    refuse_connections: bool = False
    #: switch `refuse_connections` off by itself after this many seconds (None = stay refusing)
    refuse_for_s: float | None = None
    scope: Scope = "stream"
    #: Stop injecting (outcomes, not latency) after this many faulted requests; None = never.
    max_faults: int | None = None
    #: Refuse a whole stream request with 400 `parameter_invalid` when an event's identifier matches this
    #: regular expression (`re.search`); "" = off. Deterministic, not drawn, not counted by `max_faults`:
    #: a stand-in for a rule Stripe checks synchronously and the worker cannot check locally.
    reject_identifiers: str = ""
    #: Whether that 400 names the first offending event (`events[17].identifier`) in its message, as the
    #: emulator's own validation does; False gives a message without an index (the client must bisect).
    reject_names_index: bool = True

    def __post_init__(self) -> None:
        for name in _BANDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"faults.{name} must be within [0, 1], got {value}")
        if sum(getattr(self, name) for name in _BANDS) > 1.0 + 1e-9:
            raise ValueError("faults: the outcome fractions add up to more than 1")
        if self.scope not in ("stream", "all", "session"):
            raise ValueError(f"faults.scope must be 'stream', 'all' or 'session', got {self.scope!r}")
        if not 500 <= self.error_status <= 599:
            raise ValueError(f"faults.error_status must be a 5xx status, got {self.error_status}")
        for name in ("slow_response_s", "latency_s", "latency_jitter_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"faults.{name} must not be negative")
        if self.reject_identifiers:
            try:
                re.compile(self.reject_identifiers)
            except re.error as exc:
                raise ValueError(f"faults.reject_identifiers is not a regular expression: {exc}") from None

    @property
    def active(self) -> bool:
        return self != _NO_FAULTS

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_BANDS: tuple[str, ...] = (
    "error_retry_true",
    "error_retry_false",
    "error_no_header",
    "rate_limit",
    "lock_timeout",
    "reset_before",
    "reset_after",
    "slow_response",
)
_OUTCOMES: tuple[Outcome, ...] = tuple(Outcome(name) if name != "slow_response" else Outcome.SLOW for name in _BANDS)
_NO_FAULTS = Faults()
_FIELDS = frozenset(f.name for f in dataclasses.fields(Faults))


def faults_from_json(current: Faults, changes: dict[str, Any], *, replace: bool = False) -> Faults:
    """Apply a JSON object of changes (unknown keys are an error); `replace` starts from no faults."""
    unknown = set(changes) - _FIELDS
    if unknown:
        raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
    base = _NO_FAULTS if replace else current
    try:
        return dataclasses.replace(base, **changes)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    latency_s: float


NO_DECISION = Decision(Outcome.NONE, 0.0)


class FaultPlanner:
    """Draws a decision per request from a seeded generator."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self._seed = seed
        self.set(faults)

    def set(self, faults: Faults) -> None:
        self.faults = faults
        self.active = faults.active
        self._rng = random.Random(self._seed)  # noqa: S311 - reproducible faults, not cryptography
        self._injected = 0

    def applies(self, is_stream: bool, is_session: bool = False) -> bool:
        scope = self.faults.scope
        if scope == "session":
            return is_session
        return is_stream or scope == "all"

    def decide(self, is_stream: bool, is_session: bool = False) -> Decision:
        if not self.active or not self.applies(is_stream, is_session):
            return NO_DECISION
        faults = self.faults
        latency = faults.latency_s
        if faults.latency_jitter_s > 0:
            latency += self._rng.uniform(0.0, faults.latency_jitter_s)
        outcome = self._draw(faults)
        return Decision(outcome, latency) if latency or outcome is not Outcome.NONE else NO_DECISION

    def _draw(self, faults: Faults) -> Outcome:
        if faults.max_faults is not None and self._injected >= faults.max_faults:
            return Outcome.NONE
        point = self._rng.random()
        edge = 0.0
        for name, outcome in zip(_BANDS, _OUTCOMES, strict=True):
            edge += getattr(faults, name)
            if point < edge:
                self._injected += 1
                return outcome
        return Outcome.NONE


def first_rejected(faults: Faults, identifiers: Sequence[str]) -> int | None:
    """The index of the first identifier `faults.reject_identifiers` matches, or None (also when it is off)."""
    if not faults.reject_identifiers:
        return None
    search = re.compile(faults.reject_identifiers).search
    return next((index for index, identifier in enumerate(identifiers) if search(identifier)), None)
