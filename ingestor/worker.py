"""The worker: wires consumer, decoder, batcher, budget, session, delivery, dead letters and offsets.

```
getmany ─▶ Decoder ─▶ Batcher ─▶ queue ─▶ sender tasks (Delivery: budget ▸ token ▸ POST ▸ classify)
   │           └─ rejects ─▶ DeadLetterWriter ─┐                      │
   └─▶ OffsetTracker.open(chunk) ◀── complete ──┴──────────────────────┘ ─▶ commit loop
```

Lifecycle: `async with Worker(settings) as worker: await worker.run()`. `request_stop()` (SIGTERM)
stops fetching; `run` then drains in-flight work within INGESTOR_DRAIN_TIMEOUT_S, stops the background
tasks (at most SHUTDOWN_STEP_S), commits what is done (at most SHUTDOWN_STEP_S more) and returns. On
revoke, the revoked partitions' work is drained and committed before release.

Each concept is a module of its own; this one only puts them together:

- `startup`: the collaborators, built and started before anything uses them (`WorkerCore`, `WorkerParts`);
- `consumer_loop`: poll, ingest, backpressure; `senders`: sender tasks and linger;
- `committer`: dead letters with their offsets, then the consumer's offsets;
- `rebalance`: revoke and assign, drains; `probes`: the Kafka probe, health facts, lag, state metrics;
- `catalog_refresh`: the meter catalog kept current; `tasks`: the background tasks, owned in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from ingestor import probes
from ingestor.clock import SYSTEM_CLOCK, Clock
from ingestor.committer import Committer
from ingestor.consumer_loop import ConsumerLoop
from ingestor.metrics import Metrics, WorkerState
from ingestor.rebalance import Rebalancer, drain
from ingestor.senders import Senders
from ingestor.startup import WorkerCore, WorkerParts, build_core, build_parts, serve_operator_endpoints
from ingestor.tasks import TaskOwner

if TYPE_CHECKING:
    from types import TracebackType

    from ingestor.budget import RequestBudget
    from ingestor.catalog import MeterCatalog
    from ingestor.deadletter import DeadLetterWriter
    from ingestor.events import Decoder
    from ingestor.exchange import DemandExchange
    from ingestor.observability import HealthState
    from ingestor.offsets import OffsetTracker, TopicPartition
    from ingestor.session import SessionManager
    from ingestor.settings import Settings

log = logging.getLogger("ingestor.worker")

#: Shutdown: how long the background tasks may take to stop, and then the final commit.
SHUTDOWN_STEP_S = 10.0


@dataclass(frozen=True)
class _Running:
    """A started worker's parts and the loops that run on them."""

    parts: WorkerParts
    consumer_loop: ConsumerLoop
    senders: Senders
    committer: Committer
    rebalancer: Rebalancer
    observer: probes.HealthObserver
    lags: probes.Lags


class Worker:
    """One replica of the ingestion worker."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.core: WorkerCore = build_core(settings, clock)
        self.state = WorkerState.register(self.metrics)
        probes.export_core_state(self.state, self.core, clock)
        self._stop = asyncio.Event()
        self._tasks = TaskOwner(self._stop.set)
        self._exit = contextlib.AsyncExitStack()
        #: the ports served (0 until bound; INGESTOR_METRICS_PORT or INGESTOR_WEBHOOK_PORT 0 binds any)
        self.metrics_port = 0
        self.webhook_port = 0
        #: set by `async with`: the worker runs only once started
        self._running: _Running | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._exit.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._exit.aclose()

    async def _start(self) -> None:
        s, core = self.settings, self.core
        self.metrics_port = await serve_operator_endpoints(s, self.metrics, core.health, self._exit)
        parts = await build_parts(s, core, metrics=self.metrics, clock=self.clock, stop=self._stop, exits=self._exit)
        running = self._assemble(parts)
        probes.export_started_state(self.state, parts, running.consumer_loop, running.lags, self.clock)
        core.health.lag = running.lags.total
        self._running = running
        self.webhook_port = parts.webhook_port
        parts.consumer.subscribe(topics=list(s.topics), listener=running.rebalancer)
        if parts.exchange is not None:
            self._exit.push_async_callback(parts.exchange.stop)  # also closes what a failed start opened
            await parts.exchange.start(self._tasks.on_done)

    def _assemble(self, parts: WorkerParts) -> _Running:
        s, core, metrics, clock = self.settings, self.core, self.metrics, self.clock
        senders = Senders(
            queue=core.queue, batcher=core.batcher, deliver=parts.delivery.deliver, clock=clock, linger_ms=s.linger_ms
        )
        committer = Committer(
            consumer=parts.consumer,
            tracker=core.tracker,
            dead_letters=parts.dead_letters,
            transactions=parts.transactions,
            metrics=metrics,
            health=core.health,
        )
        return _Running(
            parts=parts,
            consumer_loop=ConsumerLoop(
                settings=s, core=core, parts=parts, metrics=metrics, clock=clock, stop=self._stop
            ),
            senders=senders,
            committer=committer,
            rebalancer=Rebalancer(
                settings=s,
                core=core,
                parts=parts,
                senders=senders,
                committer=committer,
                metrics=metrics,
                clock=clock,
            ),
            observer=probes.HealthObserver(core, parts, clock),
            lags=probes.Lags(parts.consumer, core.tracker, core.first_offsets),
        )

    def _started(self) -> _Running:
        if self._running is None:
            raise RuntimeError("the worker is not started: `async with Worker(...)` first")
        return self._running

    def request_stop(self) -> None:
        """Stop fetching; `run` drains and returns."""
        if not self._stop.is_set():
            log.info("stop requested; draining", extra={"deadline_s": self.settings.drain_timeout_s})
        self._stop.set()

    async def run(self) -> None:
        """Consume and deliver until `request_stop`, then drain and commit."""
        running = self._started()
        try:
            self._spawn_background(running)
            await running.consumer_loop.poll_loop()
            await drain(self.core, self.settings.drain_timeout_s, self.clock)
        finally:
            self.core.health.running = False
            results = await self._tasks.stop(SHUTDOWN_STEP_S)
            await running.committer.final_commit(SHUTDOWN_STEP_S)
        for result in results:
            if isinstance(result, Exception):
                raise result

    def _spawn_background(self, running: _Running) -> None:
        s, core, parts, spawn = self.settings, self.core, running.parts, self._tasks.spawn
        for i in range(s.max_in_flight):
            spawn(f"sender-{i}", running.senders.sender())
        spawn("linger", running.senders.linger_loop())
        spawn("commit", running.committer.commit_loop(s.commit_interval_ms, running.observer.observe))
        spawn("kafka-probe", probes.kafka_probe_loop(parts.consumer, core.health))
        spawn("adjustments", parts.adjuster.run())
        if parts.transactions is None:
            spawn("dead-letters", parts.dead_letters.run())
        if s.meter_catalog == "stripe":
            spawn("catalog-refresh", parts.catalog_keeper.run())
        if core.unknown_meters is not None:
            refresh = parts.catalog_keeper.refresh
            spawn("unknown-meters", running.consumer_loop.unknown_meter_loop(core.unknown_meters, refresh))

    # ----------------------------------------------------------------- what tests and operators read

    def lags(self) -> dict[TopicPartition, int]:
        """Records behind each assigned partition's end (none before the worker started)."""
        return {} if self._running is None else self._running.lags()

    def total_lag(self) -> int:
        return sum(self.lags().values())

    @property
    def tracker(self) -> OffsetTracker:
        return self.core.tracker

    @property
    def budget(self) -> RequestBudget:
        return self.core.budget

    @property
    def catalog(self) -> MeterCatalog:
        return self.core.catalog

    @property
    def health(self) -> HealthState:
        return self.core.health

    @property
    def consumer(self) -> Any:
        return self._started().parts.consumer

    @property
    def sessions(self) -> SessionManager:
        return self._started().parts.sessions

    @property
    def dead_letters(self) -> DeadLetterWriter:
        return self._started().parts.dead_letters

    @property
    def decoder(self) -> Decoder:
        return self._started().parts.decoder

    @property
    def exchange(self) -> DemandExchange | None:
        return self._started().parts.exchange
