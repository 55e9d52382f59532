"""Start-up: the worker's collaborators, each constructed (and started) before anything uses it.

`build_core` makes the parts that need no I/O (offsets, batcher, catalog, budget, health), when the
worker is created. `serve_operator_endpoints` serves /metrics, /healthz and /readyz first. `build_parts`
starts everything else that talks to the outside, in this order, and hands back a frozen `WorkerParts`:
the HTTP client and the first meter event session (a key Stripe refuses stops start-up), the meter
catalog, the dead-letter producer and writer (transactional ones when INGESTOR_DLQ_TRANSACTIONAL), the
webhook site, delivery and adjustments, the consumer (the dead-letter topic must exist; the identifier
namespace and the offset-reset policy are settled before the group is joined) and the demand exchange
(built here, started by the worker once the consumer subscribed). Whatever it opened is closed by the
caller's exit stack, also when a later step fails.

A setting found wrong at start stops it with a SettingsError (exit 2) naming the variable.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from ingestor import catalog as catalog_mod
from ingestor import cluster, offset_reset, probes
from ingestor import exchange as exchange_mod
from ingestor.adjustments import Adjuster, AdjustmentClient, Pacer, RetryPolicy
from ingestor.batching import Batch, Batcher
from ingestor.budget import BudgetGate, BudgetPolicy, RequestBudget
from ingestor.catalog_refresh import CatalogKeeper, key_refused
from ingestor.deadletter import DEFAULT_TOPIC_MAX_BYTES, DeadLetterWriter, TopicLimit
from ingestor.delivery import Delivery
from ingestor.errors import SessionAuthError, SessionError
from ingestor.events import Decoder
from ingestor.meter_refresh import UnknownMeterHold
from ingestor.observability import HealthState, http_app, start_site
from ingestor.offsets import OffsetTracker, TopicPartition
from ingestor.partition_health import PartitionWatch
from ingestor.rebalance import Ownership
from ingestor.session import SessionManager, create_session
from ingestor.settings import SettingsError
from ingestor.stream_client import StreamClient
from ingestor.stream_transport import Http1Transport
from ingestor.stripe_http import AiohttpTransport, StripeHttp
from ingestor.transactions import PartitionTransactions
from ingestor.webhook import webhook_app

if TYPE_CHECKING:
    from contextlib import AsyncExitStack

    from aiohttp import web

    from ingestor.clock import Clock
    from ingestor.exchange import DemandExchange
    from ingestor.metrics import Metrics
    from ingestor.settings import Settings

log = logging.getLogger("ingestor.startup")

#: The dead-letter producer never refuses a record on its own: the topic's limit is judged by the writer
#: (it writes an oversized letter without its original) and by the broker.
DLQ_PRODUCER_MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class WorkerCore:
    """The parts that need no I/O, made with the worker: shared by every loop."""

    tracker: OffsetTracker
    batcher: Batcher
    catalog: catalog_mod.MeterCatalog
    #: meter_unknown records waiting for a catalog refresh (a catalog read from Stripe only)
    unknown_meters: UnknownMeterHold | None
    budget: RequestBudget
    gate: BudgetGate
    partition_watch: PartitionWatch
    health: HealthState
    queue: asyncio.Queue[Batch]
    #: each partition's first offset consumed since its assignment (its lag before a first commit)
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)


def build_core(settings: Settings, clock: Clock) -> WorkerCore:
    watch = PartitionWatch()
    budget = RequestBudget(
        settings.effective_rps_budget, clock.monotonic(), BudgetPolicy(headroom=settings.budget_headroom)
    )
    return WorkerCore(
        tracker=OffsetTracker(),
        batcher=Batcher(settings.batch_max_events, settings.batch_max_bytes),
        catalog=catalog_mod.MeterCatalog(),
        unknown_meters=UnknownMeterHold() if settings.meter_catalog == "stripe" else None,
        budget=budget,
        gate=BudgetGate(budget, clock),
        partition_watch=watch,
        health=HealthState(
            stuck_after=settings.stuck_after_s,
            monotonic=clock.monotonic,
            stalled_partition=probes.stalled_partition(watch, clock),
        ),
        queue=asyncio.Queue(),
    )


@dataclass(frozen=True)
class WorkerParts:
    """The started collaborators. `transactions` and `exchange` are None when the settings turn them off."""

    webhook_port: int
    sessions: SessionManager
    producer: Any
    dead_letters: DeadLetterWriter
    transactions: PartitionTransactions | None
    delivery: Delivery
    adjuster: Adjuster
    consumer: Any
    decoder: Decoder
    catalog_keeper: CatalogKeeper
    ownership: Ownership
    exchange: DemandExchange | None


async def serve_operator_endpoints(
    settings: Settings, metrics: Metrics, health: HealthState, exits: AsyncExitStack
) -> int:
    """/metrics, /healthz and /readyz, first of all (a start-up that hangs is seen there); the bound port."""
    app = http_app(metrics, health)
    paths = "/metrics /healthz /readyz"
    return await _Sites(settings.metrics_host, exits).serve(app, settings.metrics_port, "INGESTOR_METRICS_PORT", paths)


async def build_parts(  # noqa: PLR0913 - the worker's core, context and exit stack, each needed
    settings: Settings,
    core: WorkerCore,
    *,
    metrics: Metrics,
    clock: Clock,
    stop: asyncio.Event,
    exits: AsyncExitStack,
) -> WorkerParts:
    """Start every collaborator in order; `exits` closes each one opened (the caller closes it on failure)."""
    s = settings
    serve = _Sites(s.metrics_host, exits).serve
    connector = aiohttp.TCPConnector(limit=s.max_in_flight + 8, ttl_dns_cache=300, keepalive_timeout=30)
    http = aiohttp.ClientSession(connector=connector)
    exits.push_async_callback(http.close)
    transport = AiohttpTransport(http)
    stripe = StripeHttp(
        transport, s.stripe_api_base, stripe_version=s.stripe_version, timeout=s.request_timeout_s, api_key=s.api_key
    )
    # the hot request's own client (BENCHMARKS.md); room over the senders for a split batch's halves, sent at once
    stream_transport = Http1Transport(s.max_in_flight + 8)
    exits.push_async_callback(stream_transport.close)
    meter_events = StripeHttp(
        stream_transport, s.stripe_meter_events_base, stripe_version=s.stripe_version, timeout=s.request_timeout_s
    )
    sessions = SessionManager(
        functools.partial(create_session, stripe),
        clock=clock,
        margin_seconds=s.session_refresh_margin_s,
    )
    await exits.enter_async_context(sessions)
    await _check_key(sessions)
    keeper = CatalogKeeper(core.catalog, stripe, s)
    await keeper.load(stop)
    make_producer = functools.partial(_make_producer, s)
    producer = make_producer(None)
    await producer.start()
    exits.push_async_callback(producer.stop)
    limit = TopicLimit(functools.partial(_read_dlq_limit, s))
    await limit.refresh()
    dead_letters = DeadLetterWriter(producer, s.dlq_topic, core.tracker, metrics, limit=limit, clock=clock)
    transactions = None
    if s.dlq_transactional:
        transactions = PartitionTransactions(
            make_producer,
            prefix=f"ingestor-dlq-{s.group_id}",
            group_id=s.group_id,
            letters=dead_letters,
            tracker=core.tracker,
            topic_partition=KafkaTopicPartition,
            clock=clock,
        )
        exits.push_async_callback(transactions.stop)
    webhook_port = 0
    if s.webhook_port:
        webhook_port = await serve(
            _webhook_app(s, producer, metrics), s.webhook_port, "INGESTOR_WEBHOOK_PORT", "POST /webhooks/stripe"
        )
    delivery = Delivery(
        client=StreamClient(meter_events),
        sessions=sessions,
        gate=core.gate,
        dead_letters=dead_letters,
        tracker=core.tracker,
        metrics=metrics,
        clock=clock,
        retry_base=s.retry_base_s,
        retry_max=s.retry_max_s,
        retry_deadline=s.retry_deadline_s,
    )
    adjuster = Adjuster(
        client=AdjustmentClient(stripe),
        tracker=core.tracker,
        dead_letters=dead_letters,
        metrics=metrics,
        clock=clock,
        pacer=Pacer(s.effective_api_rps, clock),
        retry=RetryPolicy(s.adjustment_retry_base_s, s.adjustment_retry_max_s, s.retry_deadline_s),
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.bootstrap_servers,
        group_id=s.group_id,
        client_id=s.client_id,
        enable_auto_commit=False,
        auto_offset_reset=offset_reset.client_policy(s.auto_offset_reset),
        isolation_level="read_committed",
        max_poll_interval_ms=max(300_000, int(s.drain_timeout_s * 2000)),
        **s.kafka_security(),
    )
    await consumer.start()
    exits.push_async_callback(consumer.stop)
    await _check_topics(s, consumer)
    decoder = await _prepare_partitions(s, consumer, core.catalog, clock)
    # budget by demand: the exchange sets the gate's quota (None: by owned partitions, see `rebalance`)
    ownership = Ownership(core.tracker, consumer, s.topics)
    exchange = exchange_mod.from_settings(s, core.gate, ownership, clock)
    return WorkerParts(
        webhook_port=webhook_port,
        sessions=sessions,
        producer=producer,
        dead_letters=dead_letters,
        transactions=transactions,
        delivery=delivery,
        adjuster=adjuster,
        consumer=consumer,
        decoder=decoder,
        catalog_keeper=keeper,
        ownership=ownership,
        exchange=exchange,
    )


def _make_producer(s: Settings, transactional_id: str | None) -> Any:
    """The dead-letter (and webhook) producer: idempotent, acks=all; transactional when given an id."""
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


async def _read_dlq_limit(s: Settings) -> int:
    """The dead-letter topic's max.message.bytes (its own setting or the broker's default)."""
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


def _webhook_app(s: Settings, producer: Any, metrics: Metrics) -> web.Application:
    """Stripe's error reports (webhooks) back to Kafka, on their own port: it faces Stripe, /metrics does not."""
    return webhook_app(
        secret=s.webhook_secret,
        tolerance=s.webhook_tolerance_s,
        sender=producer,
        topic=s.effective_error_report_topic,
        metrics=metrics,
    )


# --- start-up checks: a setting found wrong at start stops it with a SettingsError (exit 2)


class _Sites:
    """The HTTP sites the worker serves, on INGESTOR_METRICS_HOST; each is cleaned up by the exit stack."""

    def __init__(self, host: str, exits: AsyncExitStack) -> None:
        self._host = host
        self._exits = exits

    async def serve(self, app: web.Application, port: int, env: str, paths: str) -> int:
        """Serve `app` on `port` (a port in use is a SettingsError naming `env`); the bound port."""
        host = self._host
        try:
            runner, bound = await start_site(app, host, port)
        except OSError as exc:
            raise SettingsError(f"{env}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._exits.push_async_callback(runner.cleanup)
        address = f"http://{_url_host(host)}:{bound}"
        log.info("serving %s at %s", paths, address, extra={"paths": paths, "address": address, "setting": env})
        return bound


async def _check_key(sessions: SessionManager) -> None:
    """The first session: a key Stripe refuses (401/403) at start is a setting to fix, not an incident.

    Any other failure (Stripe unreachable, 5xx) is left to the rotator, which retries it (and alerts).
    """
    try:
        await sessions.token()
    except SessionAuthError as exc:
        raise key_refused("creating a meter event session", exc.status) from None
    except SessionError as exc:
        log.warning("no meter event session yet; retrying in the background", extra={"error": str(exc)})


async def _check_topics(s: Settings, consumer: Any) -> None:
    """Refuse to start without the dead-letter topic: a bad record would block its partition forever."""
    existing = await consumer.topics()
    needed = {"INGESTOR_DLQ_TOPIC": s.dlq_topic}
    if s.webhook_port:
        needed["INGESTOR_ERROR_REPORT_TOPIC"] = s.effective_error_report_topic
    for env, topic in needed.items():
        if topic not in existing:
            raise SettingsError(f"{env}: topic {topic!r} does not exist on the cluster; create it first")
    missing = sorted(set(s.topics) - existing)
    if missing:
        log.warning("source topics do not exist yet; waiting for them", extra={"topics": missing})


async def _prepare_partitions(s: Settings, consumer: Any, catalog: catalog_mod.MeterCatalog, clock: Clock) -> Decoder:
    """Before joining the group: the identifier namespace (the cluster's) and the offset-reset policy."""
    info = await cluster.describe(s.kafka.client_options(), s.topics)
    namespace = cluster.identifier_namespace(s.identifier_namespace, info.cluster_id)
    decoder = Decoder(catalog, max_record_bytes=s.max_record_bytes, namespace=namespace)
    log.info("identifier namespace", extra={"namespace": namespace, "cluster_id": info.cluster_id})
    if s.auto_offset_reset == "safe":
        await offset_reset.check_safe(consumer, s.group_id, info.partitions, clock.time())
    return decoder


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
