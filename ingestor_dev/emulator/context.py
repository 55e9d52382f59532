"""What every handler works with: settings, state, clock, faults; and one call's request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aiohttp import web

    from ingestor_dev.emulator.config import Clock, EmulatorConfig
    from ingestor_dev.emulator.faults import FaultPlanner, Faults
    from ingestor_dev.emulator.state import EmulatorState
    from ingestor_dev.emulator.windows import FixedWindowLimiter


class FaultSwitch(Protocol):
    """The part of the emulator that applies faults (listening socket included)."""

    def set_faults(self, faults: Faults | None = None, /, **changes: Any) -> Faults: ...

    async def settle(self) -> None: ...


@dataclass(slots=True)
class Context:
    config: EmulatorConfig
    state: EmulatorState
    clock: Clock
    planner: FaultPlanner
    limiter: FixedWindowLimiter
    switch: FaultSwitch


@dataclass(slots=True)
class Call:
    request: web.BaseRequest
    params: dict[str, str] = field(default_factory=dict)
    #: injected latency not yet served
    latency: float = 0.0
    #: when the request arrived, if the wire tap said so (see `arrival`); None: the clock decides
    arrival: float | None = None

    async def serve_latency(self) -> None:
        if self.latency > 0:
            delay, self.latency = self.latency, 0.0
            await asyncio.sleep(delay)
