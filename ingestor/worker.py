"""The worker: wires consumer, decoder, batcher, budget, session, delivery, dead letters and offsets.

```
getmany ─▶ Decoder ─▶ Batcher ─▶ queue ─▶ sender tasks (Delivery: budget ▸ token ▸ POST ▸ classify)
   │           └─ rejects ─▶ DeadLetterWriter ─┐                      │
   └─▶ OffsetTracker.open(chunk) ◀── complete ──┴──────────────────────┘ ─▶ commit loop
```

Lifecycle: `async with Worker(settings) as worker: await worker.run()`. `request_stop()` (SIGTERM)
stops fetching; `run` then drains in-flight work within INGESTOR_DRAIN_TIMEOUT_S, commits what is
done and returns. On revoke, the revoked partitions' work is drained and committed before release.

Commits: partitions with dead-letter records waiting commit them with their offsets in one transaction
per partition (`ingestor.transactions`, unless INGESTOR_DLQ_TRANSACTIONAL=false); the others commit
through the consumer. Backpressure pauses every partition when INGESTOR_MAX_BUFFERED_EVENTS records are
pending, and one partition alone when it runs INGESTOR_MAX_PARTITION_AHEAD records ahead of its oldest
unfinished record (a record that cannot finish must not let its partition run on unbounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Self

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from ingestor import catalog as catalog_mod
from ingestor import cluster, offset_reset
from ingestor import exchange as exchange_mod
from ingestor.adjustments import Adjuster, AdjustmentClient, Pacer, RetryPolicy, split_poll
from ingestor.batching import Batch, Batcher
from ingestor.budget import BudgetGate, BudgetPolicy, RequestBudget
from ingestor.clock import SYSTEM_CLOCK, Clock
from ingestor.deadletter import DEFAULT_TOPIC_MAX_BYTES, DeadLetterWriter, TopicLimit
from ingestor.delivery import Delivery
from ingestor.events import Decoder
from ingestor.meter_refresh import UnknownMeterHold
from ingestor.metrics import Metrics
from ingestor.observability import HealthState, http_app, start_site
from ingestor.offsets import Chunk, OffsetTracker
from ingestor.partition_health import PartitionWatch
from ingestor.session import SessionAuthError, SessionError, SessionManager, create_session
from ingestor.settings import SettingsError
from ingestor.stream_client import AiohttpTransport, StreamClient
from ingestor.stream_transport import Http1Transport
from ingestor.transactions import PartitionTransactions, due_letters
from ingestor.webhook import webhook_app

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType

    from aiohttp import web

    from ingestor.cancellation import Cancellation
    from ingestor.errors import Rejection
    from ingestor.settings import Settings

log = logging.getLogger("ingestor.worker")

POLL_TIMEOUT_MS = 100
RESUME_FRACTION = 0.5
#: Over INGESTOR_MAX_BUFFERED_EVENTS the worker first stops taking records for up to this long, then pauses
#: the consumer (see `_backpressure`); while it waits it looks again every HOLD_TICK_S.
HOLD_BEFORE_PAUSE_S = 10.0
HOLD_TICK_S = 0.005
CATALOG_RETRY_S = 5.0
KAFKA_PROBE_INTERVAL_S = 5.0
KAFKA_PROBE_TIMEOUT_S = 10.0
#: Shutdown: how long the background tasks may take to stop, and then the final commit.
SHUTDOWN_STEP_S = 10.0
#: The dead-letter producer never refuses a record on its own: the topic's limit is judged by the writer
#: (it writes an oversized letter without its original) and by the broker.
DLQ_PRODUCER_MAX_REQUEST_BYTES = 64 * 1024 * 1024


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker.on_assigned(list(assigned))


class Worker:
    """One replica of the ingestion worker."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.tracker = OffsetTracker()
        self.batcher = Batcher(settings.batch_max_events, settings.batch_max_bytes)
        self.catalog = catalog_mod.MeterCatalog()
        self.decoder = Decoder(self.catalog, max_record_bytes=settings.max_record_bytes)
        #: meter_unknown records waiting for a catalog refresh (a catalog read from Stripe only)
        self.unknown_meters = UnknownMeterHold() if settings.meter_catalog == "stripe" else None
        self.budget = RequestBudget(
            settings.effective_rps_budget, clock.monotonic(), BudgetPolicy(headroom=settings.budget_headroom)
        )
        self.gate = BudgetGate(self.budget, clock)
        # budget by demand: the exchange sets the gate's quota (None: by owned partitions, on_assigned)
        self.exchange = exchange_mod.from_settings(settings, self.gate, self._ownership, clock)
        exchange_mod.export_metrics(self.metrics, self.budget, self.exchange)
        self.partition_watch = PartitionWatch()
        self.health = HealthState(
            stuck_after=settings.stuck_after_s,
            clock=clock.monotonic,
            lag=self.total_lag,
            stalled_partition=self._stalled_partition,
        )
        self.queue: asyncio.Queue[Batch] = asyncio.Queue()
        self.metrics_port = 0
        self.webhook_port = 0
        self._stop = asyncio.Event()
        self._inflight: set[Batch] = set()
        self._revoking: set[TopicPartition] = set()
        #: set once a revoke released chunks: queued batches may hold events that are no longer ours
        self._released_seen = False
        self._paused = False
        #: when `_paused` last became true (monotonic)
        self._paused_at = 0.0
        #: partitions paused because they ran INGESTOR_MAX_PARTITION_AHEAD records ahead
        self._held: set[TopicPartition] = set()
        self._commit_lock = asyncio.Lock()
        self._first_offsets: dict[TopicPartition, int] = {}
        self._exit = contextlib.AsyncExitStack()
        self._http: aiohttp.ClientSession | None = None
        self.consumer: Any = None
        self.producer: Any = None
        self.sessions: SessionManager | None = None
        self.dead_letters: DeadLetterWriter | None = None
        self.transactions: PartitionTransactions | None = None
        self.delivery: Delivery | None = None
        self.adjuster: Adjuster | None = None
        self._export_state()

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
        s = self.settings
        self.metrics_port = await self._serve(
            http_app(self.metrics, self.health), s.metrics_port, "INGESTOR_METRICS_PORT", "/metrics /healthz /readyz"
        )
        connector = aiohttp.TCPConnector(limit=s.max_in_flight + 8, ttl_dns_cache=300, keepalive_timeout=30)
        self._http = aiohttp.ClientSession(connector=connector)
        self._exit.push_async_callback(self._http.close)
        self.sessions = SessionManager(
            functools.partial(
                create_session, self._http, s.stripe_api_base, s.api_key, s.stripe_version, s.request_timeout_s
            ),
            clock=self.clock,
            margin_seconds=s.session_refresh_margin_s,
        )
        await self._exit.enter_async_context(self.sessions)
        await self._check_key()
        await self._load_catalog()
        self.producer = self._make_producer(None)
        await self.producer.start()
        self._exit.push_async_callback(self.producer.stop)
        limit = TopicLimit(self._read_dlq_limit)
        await limit.refresh()
        self.dead_letters = DeadLetterWriter(
            self.producer, s.dlq_topic, self.tracker, self.metrics, limit=limit, clock=self.clock
        )
        if s.dlq_transactional:
            self.transactions = PartitionTransactions(
                self._make_producer,
                prefix=f"ingestor-dlq-{s.group_id}",
                group_id=s.group_id,
                letters=self.dead_letters,
                tracker=self.tracker,
                topic_partition=TopicPartition,
                clock=self.clock,
            )
            self._exit.push_async_callback(self.transactions.stop)
        if s.webhook_port:
            await self._start_webhook()
        stream_transport = Http1Transport(s.request_timeout_s, s.max_in_flight)  # the hot request's own client
        self._exit.push_async_callback(stream_transport.close)
        self.delivery = Delivery(
            client=StreamClient(stream_transport, s.stripe_meter_events_base, s.stripe_version),
            sessions=self.sessions,
            budget=self.gate,
            dead_letters=self.dead_letters,
            tracker=self.tracker,
            metrics=self.metrics,
            clock=self.clock,
            retry_base=s.retry_base_s,
            retry_max=s.retry_max_s,
            retry_deadline=s.retry_deadline_s,
        )
        self.adjuster = Adjuster(
            client=AdjustmentClient(
                AiohttpTransport(self._http, s.request_timeout_s), s.stripe_api_base, s.api_key, s.stripe_version
            ),
            tracker=self.tracker,
            dead_letters=self.dead_letters,
            metrics=self.metrics,
            clock=self.clock,
            pacer=Pacer(s.effective_api_rps, self.clock),
            retry=RetryPolicy(s.adjustment_retry_base_s, s.adjustment_retry_max_s, s.retry_deadline_s),
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            client_id=s.client_id,
            enable_auto_commit=False,
            auto_offset_reset=offset_reset.client_policy(s.auto_offset_reset),
            isolation_level="read_committed",
            max_poll_interval_ms=max(300_000, int(s.drain_timeout_s * 2000)),
            **s.kafka_security(),
        )
        await self.consumer.start()
        self._exit.push_async_callback(self.consumer.stop)
        await self._check_topics()
        await self._prepare_partitions()
        self.consumer.subscribe(topics=list(s.topics), listener=_Rebalance(self))
        if self.exchange is not None:
            self._exit.push_async_callback(self.exchange.stop)  # also closes what a failed start opened
            await self.exchange.start(self._on_task_done)

    def _make_producer(self, transactional_id: str | None) -> Any:
        """The dead-letter (and webhook) producer: idempotent, acks=all; transactional when given an id."""
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            client_id=f"{s.client_id}-dlq",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_request_size=DLQ_PRODUCER_MAX_REQUEST_BYTES,
            transactional_id=transactional_id,
            **s.kafka_security(),
        )

    async def _read_dlq_limit(self) -> int:
        """The dead-letter topic's max.message.bytes (its own setting or the broker's default)."""
        s = self.settings
        admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers, client_id=s.client_id, **s.kafka_security())
        await admin.start()
        try:
            resource = ConfigResource(ConfigResourceType.TOPIC, s.dlq_topic, configs={"max.message.bytes": None})
            responses = await admin.describe_configs([resource])
        finally:
            await admin.close()
        for response in responses:
            for _code, _message, _kind, _name, entries in response.resources:
                for name, value, *_ in entries:
                    if name == "max.message.bytes" and value:
                        return int(value)
        return DEFAULT_TOPIC_MAX_BYTES

    async def _start_webhook(self) -> None:
        """Stripe's error reports (webhooks) back to Kafka, on their own port: it faces Stripe, /metrics does not."""
        s = self.settings
        app = webhook_app(
            secret=s.webhook_secret,
            tolerance=s.webhook_tolerance_s,
            sender=self.producer,
            topic=s.effective_error_report_topic,
            metrics=self.metrics,
        )
        self.webhook_port = await self._serve(app, s.webhook_port, "INGESTOR_WEBHOOK_PORT", "POST /webhooks/stripe")

    # --- start-up checks: a setting found wrong at start stops it with a SettingsError (exit 2)

    async def _serve(self, app: web.Application, port: int, env: str, paths: str) -> int:
        """Serve `app` on INGESTOR_METRICS_HOST and `port` (a port in use is a SettingsError naming `env`)."""
        host = self.settings.metrics_host
        try:
            runner, bound = await start_site(app, host, port)
        except OSError as exc:
            raise SettingsError(f"{env}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._exit.push_async_callback(runner.cleanup)
        address = f"http://{_url_host(host)}:{bound}"
        log.info("serving %s at %s", paths, address, extra={"paths": paths, "address": address, "setting": env})
        return bound

    async def _check_key(self) -> None:
        """The first session: a key Stripe refuses (401/403) at start is a setting to fix, not an incident.

        Any other failure (Stripe unreachable, 5xx) is left to the rotator, which retries it (and alerts).
        """
        assert self.sessions is not None
        try:
            await self.sessions.token()
        except SessionAuthError as exc:
            raise _key_refused("creating a meter event session", exc.status) from None
        except SessionError as exc:
            log.warning("no meter event session yet; retrying in the background", extra={"error": str(exc)})

    async def _check_topics(self) -> None:
        """Refuse to start without the dead-letter topic: a bad record would block its partition forever."""
        s = self.settings
        existing = await self.consumer.topics()
        needed = {"INGESTOR_DLQ_TOPIC": s.dlq_topic}
        if s.webhook_port:
            needed["INGESTOR_ERROR_REPORT_TOPIC"] = s.effective_error_report_topic
        for env, topic in needed.items():
            if topic not in existing:
                raise SettingsError(f"{env}: topic {topic!r} does not exist on the cluster; create it first")
        missing = sorted(set(s.topics) - existing)
        if missing:
            log.warning("source topics do not exist yet; waiting for them", extra={"topics": missing})

    async def _prepare_partitions(self) -> None:
        """Before joining the group: the identifier namespace (the cluster's) and the offset-reset policy."""
        s = self.settings
        info = await cluster.describe(s.kafka.client_options(), s.topics)
        namespace = cluster.identifier_namespace(s.identifier_namespace, info.cluster_id)
        self.decoder = Decoder(self.catalog, max_record_bytes=s.max_record_bytes, namespace=namespace)
        log.info("identifier namespace", extra={"namespace": namespace, "cluster_id": info.cluster_id})
        if s.auto_offset_reset == "safe":
            await offset_reset.check_safe(self.consumer, s.group_id, info.partitions, self.clock.time())

    async def _load_catalog(self) -> None:
        s = self.settings
        if s.meter_catalog == "static":
            self.catalog.replace(catalog_mod.from_static(s.meters))
            return
        if s.meter_catalog == "off":
            return
        while not self._stop.is_set():
            try:
                self.catalog.replace(await self._fetch_catalog())
            except catalog_mod.CatalogError as exc:
                if exc.status in _REFUSED:
                    raise _key_refused("reading the meter catalog (GET /v1/billing/meters)", exc.status) from None
                log.error("cannot read the meter catalog from Stripe; retrying", extra={"error": str(exc)})  # noqa: TRY400
                await asyncio.sleep(CATALOG_RETRY_S)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.error("cannot read the meter catalog from Stripe; retrying", extra={"error": str(exc)})  # noqa: TRY400
                await asyncio.sleep(CATALOG_RETRY_S)
            else:
                log.info("meter catalog loaded", extra={"meters": len(self.catalog)})
                return

    async def _fetch_catalog(self) -> catalog_mod.MeterCatalog:
        assert self._http is not None
        s = self.settings
        http, base, key, version = self._http, s.stripe_api_base, s.api_key, s.stripe_version
        return await catalog_mod.fetch_from_stripe(http, base, key, version, timeout=s.request_timeout_s)

    def request_stop(self) -> None:
        """Stop fetching; `run` drains and returns."""
        if not self._stop.is_set():
            log.info("stop requested; draining", extra={"deadline_s": self.settings.drain_timeout_s})
        self._stop.set()

    async def run(self) -> None:
        """Consume and deliver until `request_stop`, then drain and commit."""
        tasks: list[asyncio.Task[Any]] = []
        try:
            tasks = self._spawn_background()
            await self._poll_loop()
            await self._drain(self.settings.drain_timeout_s)
        finally:
            self.health.running = False
            results = await self._stop_background(tasks)
            await self._final_commit()
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _stop_background(self, tasks: list[asyncio.Task[Any]]) -> list[BaseException | None]:
        """Cancel the background tasks and wait for them, at most SHUTDOWN_STEP_S: a task that does not
        end must not keep the worker past its grace period (what it held is redelivered, same identifiers)."""
        for task in tasks:
            task.cancel()
        if not tasks:
            return []
        done, stuck = await asyncio.wait(tasks, timeout=SHUTDOWN_STEP_S)
        if stuck:
            log.error("background tasks did not stop in time", extra={"tasks": sorted(t.get_name() for t in stuck)})
        return [None if t.cancelled() else t.exception() for t in done]

    async def _final_commit(self) -> None:
        try:
            await asyncio.wait_for(self._commit(), SHUTDOWN_STEP_S)
        except TimeoutError:
            log.error("the final commit did not finish in time; the next owner resends what it covered")  # noqa: TRY400

    def _spawn_background(self) -> list[asyncio.Task[Any]]:
        assert self.dead_letters is not None
        coros = [self._sender(i) for i in range(self.settings.max_in_flight)]
        coros += [self._linger_loop(), self._commit_loop(), self._kafka_probe_loop()]
        if self.adjuster is not None:
            coros.append(self.adjuster.run())
        if self.transactions is None:
            coros.append(self.dead_letters.run())
        if self.settings.meter_catalog == "stripe":
            coros.append(self._catalog_loop())
        if self.unknown_meters is not None:
            coros.append(self._unknown_meter_loop())
        tasks = [asyncio.create_task(c, name=f"ingestor-{getattr(c, '__qualname__', 'task')}") for c in coros]
        for task in tasks:
            task.add_done_callback(self._on_task_done)
        return tasks

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed; stopping", exc_info=task.exception())
            self._stop.set()

    # ----------------------------------------------------------------- the hot loop

    async def _poll_loop(self) -> None:
        consumer = self.consumer
        max_records = self.settings.fetch_max_records
        while not self._stop.is_set():
            if self._backpressure():  # over the buffer limit: take nothing for now (see _backpressure)
                await asyncio.sleep(HOLD_TICK_S)
                continue
            try:
                data = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=max_records)
            except KafkaError as exc:
                log.warning("fetch failed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            if data:
                self._ingest(data)

    def _ingest(self, data: dict[TopicPartition, list[Any]]) -> None:
        now_wall, now = time.time(), self.clock.monotonic()
        tracker, batcher, queue = self.tracker, self.batcher, self.queue
        for tp, records in data.items():
            if not records:
                continue
            self._first_offsets.setdefault(tp, records[0].offset)
            cancels: list[Cancellation] = []
            decoded = self.decoder.decode(records, now_wall, cancels)
            # one chunk per poll; a cancellation gets a chunk of its own (see ingestor.adjustments)
            for part in split_poll(records, *decoded, cancels):
                chunk = tracker.open(tp, part.start, part.end, part.count)
                if chunk.released:
                    break
                rejected = part.rejected
                if rejected:
                    if self.unknown_meters is not None:  # they wait for one catalog refresh (see meter_refresh)
                        rejected = self.unknown_meters.hold(chunk, rejected)
                    self._dead_letter(chunk, rejected, now_wall)
                for batch in batcher.add(chunk, part.events, part.sources, now):
                    queue.put_nowait(batch)
                if part.cancellation is not None:
                    self.adjuster.submit(chunk, part.cancellation)  # type: ignore[union-attr]
            self.metrics.events_consumed.labels(tp.topic).inc(len(records))

    def _dead_letter(self, chunk: Chunk, rejected: list[tuple[Any, Rejection]], now_wall: float) -> None:
        assert self.dead_letters is not None
        for record, rejection in rejected:
            identifier = self.decoder.identifier_of(record)
            self.dead_letters.submit(
                chunk, record, rejection, identifier=identifier, first_failure=now_wall, last_failure=now_wall
            )

    def _backpressure(self) -> bool:
        """Pause everything above INGESTOR_MAX_BUFFERED_EVENTS pending records, and each partition that
        ran INGESTOR_MAX_PARTITION_AHEAD records ahead of its oldest unfinished one; resume at half.

        Above the limit the worker first only stops polling, for up to HOLD_BEFORE_PAUSE_S (True: do not
        poll now): pausing makes aiokafka drop the fetch it holds for each partition (up to
        max_partition_fetch_bytes), to fetch it again on resume; without the hold a backlog's peak RSS was
        about 15 MB higher (BENCHMARKS.md). A longer stall (an outage) pauses the consumer
        as before, which keeps polling within max.poll.interval.ms.
        """
        limit = self.settings.max_buffered_events
        if not self._paused and self.tracker.pending >= limit:
            self._paused = True
            self._paused_at = self.clock.monotonic()
        elif self._paused and self.tracker.pending < limit * RESUME_FRACTION:
            self._paused = False
        holding = self._paused and self.clock.monotonic() - self._paused_at < HOLD_BEFORE_PAUSE_S
        assignment = self.consumer.assignment()
        self._hold_partitions_ahead(assignment)
        wanted = assignment if self._paused and not holding else self._held & assignment
        now_paused = self.consumer.paused()
        if wanted - now_paused:
            self.consumer.pause(*(wanted - now_paused))
        if now_paused - wanted:
            self.consumer.resume(*(now_paused - wanted))
        return holding

    def _hold_partitions_ahead(self, assignment: set[TopicPartition]) -> None:
        ahead, limit = self.tracker.ahead, self.settings.max_partition_ahead
        held = self._held
        held &= assignment
        for tp in assignment:
            n = ahead((tp.topic, tp.partition))  # type: ignore[arg-type]
            if tp in held:
                if n < limit * RESUME_FRACTION:
                    held.discard(tp)
            elif n >= limit:
                held.add(tp)
                log.warning(
                    "partition ran ahead of its oldest unfinished record; pausing it",
                    extra={
                        "partition": f"{tp.topic}/{tp.partition}",
                        "ahead": n,
                        "commit": self.tracker.done_up_to(tp),
                    },
                )

    async def _sender(self, _: int) -> None:
        assert self.delivery is not None
        deliver, queue, inflight = self.delivery.deliver, self.queue, self._inflight
        while True:
            taken = await queue.get()
            batch = taken.without(self._not_ours) if self._revoking or self._released_seen else taken
            try:
                if batch is not None:
                    inflight.add(batch)
                    await deliver(batch)
            finally:
                if batch is not None:
                    inflight.discard(batch)
                queue.task_done()

    def _not_ours(self, chunk: Chunk) -> bool:
        """Events not to send: their partition was revoked or is being revoked (the new owner sends them)."""
        return chunk.released or chunk.tp in self._revoking

    async def _linger_loop(self) -> None:
        linger = self.settings.linger_ms / 1000
        tick = max(0.002, linger / 4)
        while True:
            await asyncio.sleep(tick)
            batch = self.batcher.flush_due(self.clock.monotonic(), linger)
            if batch is not None:
                self.queue.put_nowait(batch)

    # ----------------------------------------------------------------- offsets

    async def _commit_loop(self) -> None:
        interval = self.settings.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self._commit()
            self._observe_health()

    async def _commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit what is done: dead-letter records with their offsets first (transactions), then the
        consumer's offsets of the other partitions. One commit at a time."""
        wanted = None if only is None else set(only)
        async with self._commit_lock:
            if self.transactions is not None:
                await self._commit_letters(wanted)
            await self._commit_offsets(wanted)

    async def _commit_letters(self, wanted: set[TopicPartition] | None) -> None:
        """Each partition's waiting dead-letter records, with its offset, in one transaction."""
        assert self.transactions is not None
        assert self.dead_letters is not None
        ready = {tp for tp in self.dead_letters.partitions() if self.transactions.ready(tp)}  # type: ignore[arg-type]
        if wanted is not None:
            ready &= wanted
        taken: dict[Any, list[Any]] = {}
        for letter in self.dead_letters.take(ready):
            taken.setdefault(letter.chunk.tp, []).append(letter)
        by_partition: dict[Any, list[Any]] = {}
        waiting: list[Any] = []  # their partitions' earlier records are not all done yet
        for tp, group in taken.items():
            due, later = due_letters(self.tracker, tp, group)
            waiting += later
            if due:
                by_partition[tp] = due
        failed: list[Any] = [letter for group in by_partition.values() for letter in group]
        try:
            results = await asyncio.gather(
                *(self.transactions.commit(tp, group) for tp, group in by_partition.items()), return_exceptions=True
            )
            failed, errors = [], []
            for group, result in zip(by_partition.values(), results, strict=True):
                if isinstance(result, BaseException):
                    failed += group
                    errors.append(result)
                else:
                    self.metrics.commits.labels("ok").inc()
                    self.health.progressed()
        finally:
            self.dead_letters.finish(failed + waiting)
        self.dead_letters.report(failed, errors)

    async def _commit_offsets(self, wanted: set[TopicPartition] | None) -> None:
        offsets = self.tracker.committable()
        if wanted is not None:
            offsets = {tp: o for tp, o in offsets.items() if tp in wanted}
        if not offsets or self.consumer is None:
            return
        try:
            await self.consumer.commit({TopicPartition(*tp): o for tp, o in offsets.items()})
        except KafkaError as exc:
            self.metrics.commits.labels("failed").inc()
            log.warning("offset commit failed; will retry", extra={"error": repr(exc)})
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels("ok").inc()
        self.health.progressed()

    async def _kafka_probe_loop(self) -> None:
        """Readiness needs Kafka reachable: a metadata round trip every few seconds."""
        while True:
            try:
                await asyncio.wait_for(self.consumer.topics(), KAFKA_PROBE_TIMEOUT_S)
            except (KafkaError, TimeoutError, OSError) as exc:
                if self.health.kafka_ok:
                    log.warning("Kafka unreachable", extra={"error": repr(exc)})
                self.health.kafka_ok = False
            else:
                self.health.kafka_ok = True
            await asyncio.sleep(KAFKA_PROBE_INTERVAL_S)

    def _observe_health(self) -> None:
        health = self.health
        if self.delivery is not None and self.delivery.last_delivery > health.last_progress:
            health.last_progress = self.delivery.last_delivery
        expiry = self.sessions.seconds_until_expiry(self.clock.monotonic()) if self.sessions else None
        health.stripe_ok = expiry is not None and expiry > 0
        health.stuck_for()  # notices lag appearing even when nobody probes
        tracker = self.tracker
        marks = {tp: (tracker.done_up_to(tp), tracker.in_flight(tp)) for tp in tracker.assigned()}
        self.partition_watch.observe(marks, self.clock.monotonic())

    def _stalled_partition(self) -> tuple[str, float] | None:
        tp, seconds = self.partition_watch.worst(self.clock.monotonic())
        return None if tp is None else (f"{tp.topic}/{tp.partition}", seconds)

    async def _drain(self, limit: float) -> None:
        """Send what is buffered and wait for everything in flight, up to `limit` seconds."""
        batch = self.batcher.flush()
        if batch is not None:
            self.queue.put_nowait(batch)
        await self._wait_until(lambda: self.tracker.pending == 0, limit)
        if self.tracker.pending:
            log.warning("drain deadline passed with work in flight", extra={"pending": self.tracker.pending})

    async def _wait_until(self, done: Callable[[], bool], limit: float) -> None:
        """Poll `done` every 10 ms for up to `limit` seconds (completions are many and small: polling
        costs less than signalling each one)."""
        deadline = self.clock.monotonic() + limit
        while not done() and self.clock.monotonic() < deadline:  # noqa: ASYNC110 - see docstring
            await asyncio.sleep(0.01)

    # ----------------------------------------------------------------- rebalances

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Release revoked partitions: finish what is in flight, commit, forget the rest.

        Only requests already under way are waited for (up to the drain deadline): events consumed but
        not yet sent are dropped and left to the partition's next owner, which reads them again from the
        committed offset. Waiting for a whole buffer would hold the group's rebalance hostage.
        """
        self.metrics.rebalances.labels("revoked").inc()
        gone = set(revoked)
        self._revoking |= gone
        batch = self.batcher.flush()
        if batch is not None:
            self.queue.put_nowait(batch)
        assert self.dead_letters is not None

        transactional = self.transactions is not None

        def settled() -> bool:
            busy = any(chunk.tp in gone for b in self._inflight for chunk, _ in b.parts)
            # transactional letters are written by the commit below, with the offsets
            return not busy and (transactional or not self.dead_letters.pending_for(gone))  # type: ignore[union-attr]

        await self._wait_until(settled, self.settings.drain_timeout_s)
        await self._commit(revoked)
        for tp in revoked:
            self.tracker.revoke(tp)
            self._first_offsets.pop(tp, None)
        if self.transactions is not None:
            await self.transactions.release(revoked)
        self._released_seen = True
        self._revoking -= gone
        log.info("partitions revoked", extra={"partitions": [f"{tp.topic}/{tp.partition}" for tp in revoked]})

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assigned").inc()
        for tp in assigned:  # before any await: a poll may already return these partitions' records
            self.tracker.assign(tp)
        if self.transactions is not None:
            await self.transactions.assign(assigned)  # fences earlier owners of these partitions
        self.health.joined = True
        owned, total = len(self.consumer.assignment()), self._ownership()[1]
        if self.exchange is None:
            self.gate.set_share(owned, total)
        log.info(
            "partitions assigned",
            extra={"partitions": [f"{tp.topic}/{tp.partition}" for tp in assigned], "owned": owned, "total": total},
        )

    def _ownership(self) -> tuple[int, int]:
        """(partitions this replica owns, partitions of all its topics): the budget's share. Owned as the
        tracker sees it: a partition being revoked counts until it is released (its drain needs budget)."""
        if self.consumer is None:
            return 0, 0
        owned = len(self.tracker.assigned())
        return owned, sum(len(self.consumer.partitions_for_topic(t) or ()) for t in self.settings.topics)

    # ----------------------------------------------------------------- catalog

    async def _catalog_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.meter_refresh_s)
            await self._refresh_catalog()

    async def _refresh_catalog(self) -> None:
        try:
            self.catalog.replace(await self._fetch_catalog())
        except (catalog_mod.CatalogError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("meter catalog refresh failed; keeping the last one", extra={"error": str(exc)})

    async def _unknown_meter_loop(self) -> None:
        """Held `meter_unknown` records: refresh the catalog (rate-limited), then decode them again."""
        hold = self.unknown_meters
        assert hold is not None
        while True:
            await hold.waiting.wait()
            await asyncio.sleep(max(0.0, hold.refresh_in(self.clock.monotonic())))
            held = hold.take(self.clock.monotonic())
            await self._refresh_catalog()
            waited = sum(len(records) for _, records in held)
            log.info("meter catalog refreshed for unknown event names", extra={"records": waited})
            now_wall, now = time.time(), self.clock.monotonic()
            for chunk, records in held:
                if chunk.released:  # revoked meanwhile: the partition's next owner reads them again
                    continue
                events, sources, rejected = self.decoder.decode(records, now_wall)
                self._dead_letter(chunk, rejected, now_wall)
                for batch in self.batcher.add(chunk, events, sources, now):
                    self.queue.put_nowait(batch)

    # ----------------------------------------------------------------- state for metrics

    def lags(self) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        if self.consumer is None:
            return out
        for tp in self.tracker.assigned():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            base = self.tracker.committed(tp)
            if base is None:
                base = self._first_offsets.get(tp, high)
            out[tp] = max(0, high - base)
        return out

    def total_lag(self) -> int:
        return sum(self.lags().values())

    def _export_state(self) -> None:
        m, budget = self.metrics, self.budget

        def one(value: float) -> list[tuple[tuple[str, ...], float]]:
            return [((), float(value))]

        def per_partition(values: dict[TopicPartition, int]) -> list[tuple[tuple[str, ...], float]]:
            return [((tp.topic, str(tp.partition)), float(v)) for tp, v in values.items()]

        def committed() -> dict[TopicPartition, int]:
            out = {}
            for tp in self.tracker.assigned():
                value = self.tracker.committed(tp)
                if value is not None:
                    out[TopicPartition(*tp)] = value
            return out

        def expiry() -> list[tuple[tuple[str, ...], float]]:
            left = self.sessions.seconds_until_expiry(self.clock.monotonic()) if self.sessions else None
            return [] if left is None else one(left)

        now = self.clock.monotonic
        partition_labels = ("topic", "partition")
        m.export_state(
            "ingestor_consumer_lag_records",
            "Records behind the partition's end.",
            lambda: per_partition(self.lags()),
            partition_labels,
        )
        m.export_state(
            "ingestor_partition_stalled_seconds",
            "Seconds the partition's commit has not moved while it had records pending.",
            lambda: [((tp.topic, str(tp.partition)), s) for tp, s in self.partition_watch.stalled(now()).items()],
            partition_labels,
        )
        m.export_state(
            "ingestor_partition_ahead_records",
            "Records consumed past the partition's oldest unfinished record.",
            lambda: per_partition({TopicPartition(*tp): self.tracker.ahead(tp) for tp in self.tracker.assigned()}),
            partition_labels,
        )
        m.export_state(
            "ingestor_committed_offset", "Last committed offset.", lambda: per_partition(committed()), partition_labels
        )
        m.export_state(
            "ingestor_partitions_assigned", "Partitions this replica owns.", lambda: one(len(self.tracker.assigned()))
        )
        m.export_state(
            "ingestor_partitions_paused",
            "Partitions paused for backpressure.",
            lambda: one(len(self.tracker.assigned()) if self._paused else len(self._held)),
        )
        m.export_state(
            "ingestor_buffered_events", "Records consumed and not yet done.", lambda: one(self.tracker.pending)
        )
        m.export_state(
            "ingestor_last_progress_age_seconds",
            "Seconds since the last delivery or commit.",
            lambda: one(self.health.progress_age()),
        )
        m.export_state("ingestor_ready", "1 when /readyz passes.", lambda: one(self.health.readiness()[0]))
        m.export_state("ingestor_session_expiry_seconds", "Seconds until the session token expires.", expiry)
        m.export_state(
            "ingestor_session_rotations_total",
            "Session tokens created.",
            lambda: one(self.sessions.rotations_total if self.sessions else 0),
            counter=True,
        )
        m.export_state(
            "ingestor_session_refresh_failures_total",
            "Failed session creations.",
            lambda: one(self.sessions.refresh_failures_total if self.sessions else 0),
            counter=True,
        )
        m.export_state("ingestor_budget_requests_per_second", "This replica's current pace.", lambda: one(budget.rate))
        m.export_state(
            "ingestor_budget_total_requests_per_second",
            "The account's budget, all replicas.",
            lambda: one(budget.total_rps),
        )
        m.export_state("ingestor_budget_share_ratio", "This replica's share of the budget.", lambda: one(budget.share))
        m.export_state(
            "ingestor_budget_factor_ratio", "Backoff factor after 429s (1: none).", lambda: one(budget.factor)
        )
        m.export_state(
            "ingestor_budget_utilization_ratio",
            "Requests sent / allowed, last 10 s.",
            lambda: one(budget.utilization(now())),
        )
        m.export_state(
            "ingestor_budget_saturated",
            "1 when the budget, not the worker, limits throughput.",
            lambda: one(budget.saturated(now())),
        )
        m.export_state(
            "ingestor_budget_wait_seconds_total",
            "Time requests waited for the budget.",
            lambda: one(budget.waited_seconds_total),
            counter=True,
        )
        m.export_state(
            "ingestor_adjustments_pending",
            "Cancellations consumed and not yet done (waiting for earlier records of their partition, or in flight).",
            lambda: one(self.adjuster.pending if self.adjuster else 0),
        )
        m.export_state(
            "ingestor_dlq_backlog_records",
            "Dead-letter records not written yet (transactional: until the commit that passes them).",
            lambda: one(self.dead_letters.backlog if self.dead_letters else 0),
        )


#: Stripe's answers to a key it does not accept: 401 (unknown, revoked) and 403 (lacks a permission).
_REFUSED = frozenset({401, 403})


def _key_refused(doing: str, status: int | None) -> SettingsError:
    """The key is never shown: only what was refused and how."""
    return SettingsError(
        f"STRIPE_API_KEY/STRIPE_API_KEY_FILE: Stripe refused the key (HTTP {status}) {doing}; "
        "check that it is the account's secret key (or a restricted key with meter permissions) "
        "for the right mode and that it is not revoked"
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
