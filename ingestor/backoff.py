"""Exponential backoff with full jitter, the one formula every retry loop uses.

`ceiling(failures, base, cap)` is min(cap, base·2^(failures-1)), the schedule without jitter (the
session's 401 re-authentication interval); `delay(failures, base, cap, rand)` is uniform in [0, ceiling)
for ``rand`` in [0, 1) (session creation, stream retries, adjustments, dead letters, transactions). The
exponent is clamped, so a loop that has failed for days never overflows a float.
"""

from __future__ import annotations

from typing import Final

#: 2**60 times any sane base is far above any cap; clamping here keeps the arithmetic finite.
_MAX_EXPONENT: Final = 60


def ceiling(failures: int, base: float, cap: float) -> float:
    """The longest wait after ``failures`` (≥ 1) consecutive failures: ``base`` doubled each time, up to ``cap``."""
    exponent = min(max(0, failures - 1), _MAX_EXPONENT)
    return min(cap, base * 2.0**exponent)


def delay(failures: int, base: float, cap: float, rand: float) -> float:
    """Seconds to wait after ``failures`` (≥ 1) consecutive failures; ``rand`` in [0, 1)."""
    return rand * ceiling(failures, base, cap)
