"""How big a chaos run is: the short form runs in `make test`, the long one with CHAOS_LONG=1."""

from __future__ import annotations

import os
from dataclasses import dataclass

SEED_ENV = "CHAOS_SEED"
LONG_ENV = "CHAOS_LONG"


@dataclass(frozen=True, slots=True)
class Profile:
    long: bool
    #: valid events per scenario (the corpus of bad records comes on top)
    events: int
    #: how long a fault lasts (broker down, session creation failing...), seconds
    fault_s: float
    #: Stripe refusing connections, seconds
    refuse_s: float
    #: the longest wait for a run to settle once its faults are over, seconds
    settle_s: float

    @classmethod
    def from_env(cls, value: str) -> Profile:
        if value.strip().lower() in {"1", "true", "yes"}:
            return cls(long=True, events=60_000, fault_s=20.0, refuse_s=20.0, settle_s=240.0)
        return cls(long=False, events=6_000, fault_s=6.0, refuse_s=20.0, settle_s=60.0)

    def timeout(self, short: float) -> float:
        """A pytest timeout for a scenario that needs `short` seconds in the short form."""
        return short * 5 if self.long else short


#: The profile of this test session (pytest timeouts are fixed when a module is imported).
CURRENT = Profile.from_env(os.environ.get(LONG_ENV, ""))
