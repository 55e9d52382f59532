"""The emulator's settings: one typed object, checked once at start."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from ingestor_dev.emulator.auth import is_well_formed
from ingestor_dev.emulator.faults import Faults
from ingestor_dev.emulator.limits import (
    DEFAULT_SESSION_TTL_S,
    DEFAULT_VALIDATION_INTERVAL_S,
    LIVE_STREAM_RPS,
    MAX_BODY_BYTES,
    TEST_STREAM_RPS,
)

#: Wall-clock seconds since the epoch; swapped for a fake in tests.
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    #: Session token lifetime in seconds.
    session_ttl: float = DEFAULT_SESSION_TTL_S
    #: Stream requests/s per API key; None = Stripe's (10,000 live, 25 test); 0 = unlimited.
    stream_rps_limit: int | None = None
    #: The only accepted API keys; empty = any well-formed `sk_`/`rk_` test or live key.
    api_keys: Collection[str] = ()
    #: Known customers; None = any customer exists (no `meter_event_customer_not_found`).
    customers: Collection[str] | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    #: Seeds fault decisions and object ids.
    seed: int = 0
    #: Keep arrival minus event timestamp per event for latency percentiles in the statistics.
    record_latency: bool = False
    #: Seconds between background validation passes over accepted stream events.
    validation_interval: float = DEFAULT_VALIDATION_INTERVAL_S
    max_body_bytes: int = MAX_BODY_BYTES
    faults: Faults = field(default_factory=Faults)
    #: Take a loopback stream request's `Wiretap-Arrival` header for its arrival time (see `arrival`).
    trust_arrival_header: bool = False

    def __post_init__(self) -> None:
        if self.session_ttl <= 0:
            raise ValueError(f"session_ttl must be positive, got {self.session_ttl}")
        if self.stream_rps_limit is not None and self.stream_rps_limit < 0:
            raise ValueError(f"stream_rps_limit must be >= 0, got {self.stream_rps_limit}")
        if self.validation_interval <= 0:
            raise ValueError(f"validation_interval must be positive, got {self.validation_interval}")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        bad = sorted(key for key in self.api_keys if not is_well_formed(key))
        if bad:
            raise ValueError(f"api_keys: not a Stripe secret or restricted key: {len(bad)} value(s)")
        if self.webhook_url and not (self.webhook_secret or "").startswith("whsec_"):
            raise ValueError("webhook_secret must start with 'whsec_' when webhook_url is set")
        object.__setattr__(self, "api_keys", frozenset(self.api_keys))
        if self.customers is not None:
            object.__setattr__(self, "customers", frozenset(self.customers))

    @property
    def known_keys(self) -> frozenset[str]:
        return frozenset(self.api_keys)

    @property
    def known_customers(self) -> frozenset[str] | None:
        return None if self.customers is None else frozenset(self.customers)

    def stream_limit(self, livemode: bool) -> int:
        if self.stream_rps_limit is not None:
            return self.stream_rps_limit
        return LIVE_STREAM_RPS if livemode else TEST_STREAM_RPS
