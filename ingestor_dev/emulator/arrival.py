"""When a stream request arrived: the emulator's clock, or the kernel's time passed on by the wire tap.

A real edge stamps a request when it arrives. The emulator stamps it when its event loop gets to it,
which after a pause (a full collection, a slow neighbour) is late for every request that waited:
a backlog is then stamped as arriving together, and its rate limiter and its request window see a
burst that was never on the wire.

With `EmulatorConfig.trust_arrival_header` (``--trust-arrival-header``), a stream request from a
loopback peer that carries ``Wiretap-Arrival: <epoch seconds>`` (added by ``ingestor_dev.wiretap
--stamp``, from the kernel's receive time) is taken to have arrived then: the rate limiter, the
request window and the session check all use that time. A value that does not parse, lies in the
future or is older than `MAX_AGE_S` is ignored (the emulator's clock decides). Without the setting,
or from any other peer, the header means nothing.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Final

ARRIVAL_HEADER: Final = "Wiretap-Arrival"
#: the header's name as the fast path reads it
ARRIVAL_FIELD: Final = ARRIVAL_HEADER.lower().encode()
#: a stamp older than this is not a pause but a mistake
MAX_AGE_S: Final = 60.0
#: a stamp may run ahead of the emulator's clock by this much (both read CLOCK_REALTIME)
MAX_AHEAD_S: Final = 0.05


def is_loopback(peer: object) -> bool:
    """Whether a socket's ``peername`` is a loopback address."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        return ipaddress.ip_address(peer[0].partition("%")[0]).is_loopback
    except ValueError:
        return False


def arrival_time(value: str | bytes | None, now: float) -> float:
    """The request's arrival: the header's time when it is plausible, else ``now``."""
    if not value:
        return now
    try:
        stamp = float(value)
    except ValueError:
        return now
    if not math.isfinite(stamp) or not now - MAX_AGE_S <= stamp <= now + MAX_AHEAD_S:
        return now
    return min(stamp, now)
