"""A local Stripe API for tests, the demo and benchmarks: meter event sessions and stream, synchronous
meter events, adjustments, v1 meters and event summaries, asynchronous validation with error
reports and signed webhooks, rate limits, and fault injection.

    from ingestor_dev.emulator import Emulator, EmulatorConfig, Faults

    async with Emulator(EmulatorConfig(session_ttl=3.0), port=0) as emu:
        ...  # emu.url, emu.state, emu.set_faults(...), await emu.stats()
"""

from ingestor_dev.emulator.config import EmulatorConfig
from ingestor_dev.emulator.faults import Faults
from ingestor_dev.emulator.server import Emulator

__all__ = ["Emulator", "EmulatorConfig", "Faults"]
