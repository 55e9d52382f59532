"""The clock boundary: monotonic time for pacing and expiry, wall time for humans, and sleeping.

Pure cores never read a clock; they take ``now`` (monotonic seconds). The async shells get a `Clock`
injected, so tests drive time with a fake instead of waiting (see ``tests/fakes.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Protocol


class Clock(Protocol):
    """What the async shells need from time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (pacing, deadlines, token expiry)."""
        ...

    def time(self) -> float:
        """Wall-clock unix seconds (logs and records only; never for deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the caller for ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock: `time.monotonic`, `time.time` and `asyncio.sleep`."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Final[Clock] = SystemClock()
