"""`ingestor dlq replay`: re-publish dead-lettered events once their cause is fixed.

The dead-letter topic is read from its beginning up to the end offsets taken when the command starts
(every partition assigned, no consumer group, nothing committed), so the command always ends, even
while the worker keeps dead-lettering. Each record whose `ingestor.reason` is selected is published to
the target topic with its original key, value and headers byte for byte, plus its `ingestor.identifier`
header: the worker takes that header as the identifier of an event that has none, so the replayed
event keeps the identifier it was dead-lettered with and Stripe's 24-hour de-duplication still applies.
The original record's Kafka timestamp (header `ingestor.source.timestamp`) is restored too: the worker
bills an event without a `timestamp` field at its record's timestamp, not at the time of the replay.

The worker writes every dead-letter record with the identifier its event is billed with, so replaying the
same records twice (or in overlapping `--limit` runs) bills each event once. A record written by an older
version without `ingestor.identifier` is given the identifier derived from its `ingestor.source.*` headers,
in the namespace of the cluster (INGESTOR_IDENTIFIER_NAMESPACE, else the cluster id): the same on every
replay.

Without `--reason`, only the reasons a fix outside the record can change are replayed (`FIXABLE_REASONS`);
the others are skipped and counted. Records with reason `stripe_async_error` hold Stripe's error report
about an event, not the event, so they are skipped unless asked for by name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeGuard

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ingestor import cluster, dlq_format, kafka_preflight
from ingestor.errors import REASONS, ReplayError
from ingestor.events import identifier_prefix
from ingestor.settings import SETTINGS, KafkaConnection, SettingsError, load_kafka

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

DEFAULT_DLQ_TOPIC: Final = "ingestor.dlq"
DLQ_TOPIC_ENV: Final = "INGESTOR_DLQ_TOPIC"
REPORT_REASON: Final = "stripe_async_error"
#: A null value is never billable: replayed, it would only be dead-lettered again.
TOMBSTONE_REASON: Final = "tombstone"
#: Records shown by --dry-run.
SHOW_FIRST: Final = 10
#: Sends in flight before waiting for their acknowledgements.
SEND_WINDOW: Final = 1000
FETCH_TIMEOUT_MS: Final = 1000
#: Give up when no partition moves towards its snapshot end offset for this long.
STALL_TIMEOUT_S: Final = 60.0
NO_REASON: Final = "(none)"


# --- Kafka connection settings: the worker's KAFKA_* variables only ----------------------------------


# --- the pure core: which records to replay, with which headers -------------------------------------


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """One dead-letter record as read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        found = next((v for k, v in self.headers if k == name), None)
        return None if found is None else found.decode("utf-8", "replace")

    @property
    def reason(self) -> str:
        return self.header(dlq_format.REASON) or NO_REASON

    def derived_identifier(self, namespace: str) -> str | None:
        """The identifier derived from the original record's coordinates (`ingestor.source.*`), if known."""
        topic, partition, offset = (
            self.header(h) for h in (dlq_format.SOURCE_TOPIC, dlq_format.SOURCE_PARTITION, dlq_format.SOURCE_OFFSET)
        )
        if not topic or not _digits(partition) or not _digits(offset):
            return None
        return f"{identifier_prefix(topic, int(partition), namespace)}{offset}"

    @property
    def source_timestamp_ms(self) -> int | None:
        """The original record's Kafka timestamp, from `ingestor.source.timestamp`."""
        text = self.header(dlq_format.SOURCE_TIMESTAMP)
        return int(text) if _digits(text) else None


def _digits(text: str | None) -> TypeGuard[str]:
    return text is not None and text.isascii() and text.isdigit()


#: What is replayed without `--reason`: the reasons a fix outside the record can change, so that the same
#: bytes may be billed on replay. A meter created, reactivated or given other payload keys (`meter_unknown`,
#: `meter_inactive`, `customer_missing`, `value_missing`); INGESTOR_MAX_RECORD_BYTES raised
#: (`record_too_large`); a customer created or an account fixed at Stripe (`stripe_rejected`); an outage over
#: (`retries_exhausted`). Every other reason is decided by the record's own bytes (`not_json`,
#: `value_invalid`, a timestamp older than 35 days...): replayed as they are they would only be dead-lettered
#: again, so they are replayed only when named with `--reason`. `stripe_async_error` holds Stripe's report,
#: not the event.
FIXABLE_REASONS: Final = frozenset(
    {
        "meter_unknown",
        "meter_inactive",
        "customer_missing",
        "value_missing",
        "record_too_large",
        "stripe_rejected",
        "retries_exhausted",
    }
)


def selects(reasons: frozenset[str] | None, reason: str) -> bool:
    """Whether a record with `reason` is replayed; `reasons` None: the reasons a fix can change."""
    if reasons is None:
        return reason in FIXABLE_REASONS
    return reason in reasons


def replay_headers(headers: tuple[tuple[str, bytes], ...], derived: str | None = None) -> list[tuple[str, bytes]]:
    """The original record's headers, then its `ingestor.identifier` header if it has one, else `derived`."""
    kept = dlq_format.strip_own_headers(list(headers))
    identifier = next((v for k, v in headers if k == dlq_format.IDENTIFIER), None)
    if identifier is None and derived:
        identifier = derived.encode()
    if identifier is not None:
        kept.append((dlq_format.IDENTIFIER, identifier))
    return kept


@dataclass
class Tally:
    """What a replay read and did."""

    read: int = 0
    selected: int = 0
    published: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    reports_skipped: int = 0
    first: list[DlqRecord] = field(default_factory=list)

    def count(self, record: DlqRecord, selected: bool) -> None:
        self.read += 1
        self.by_reason[record.reason] += 1
        if selected:
            self.selected += 1
            if len(self.first) < SHOW_FIRST:
                self.first.append(record)
        elif record.reason == REPORT_REASON:
            self.reports_skipped += 1


@dataclass(frozen=True)
class ReplayOptions:
    from_topic: str
    to_topic: str
    reasons: frozenset[str] | None = None
    dry_run: bool = False
    limit: int | None = None
    #: INGESTOR_IDENTIFIER_NAMESPACE; empty: the cluster id
    namespace: str = ""


# --- reading the snapshot ---------------------------------------------------------------------------


async def _describe(client: dict[str, Any], options: ReplayOptions) -> tuple[list[TopicPartition], str]:
    """The dead-letter topic's partitions, once both topics are known to exist, and the identifier namespace."""
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        described = await admin.describe_topics([options.from_topic, options.to_topic])
        cluster_id = "" if options.namespace else (await admin.describe_cluster()).get("cluster_id")
    finally:
        await admin.close()
    found = {d["topic"]: d for d in described if not d["error_code"]}
    for topic in (options.from_topic, options.to_topic):
        if topic not in found:
            raise ReplayError(f"topic {topic!r} does not exist")
    numbers = sorted(p["partition"] for p in found[options.from_topic]["partitions"])
    namespace = cluster.identifier_namespace(options.namespace, cluster_id)
    return [TopicPartition(options.from_topic, n) for n in numbers], namespace


async def read_snapshot(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> AsyncGenerator[DlqRecord]:
    """Every record of `partitions` below the end offsets they have now, in order within each partition."""
    if not partitions:
        return
    consumer.assign(partitions)
    starts: dict[TopicPartition, int] = await consumer.beginning_offsets(partitions)
    ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    for tp in partitions:
        consumer.seek(tp, starts[tp])
    remaining = {tp for tp in partitions if starts[tp] < ends[tp]}
    consumer.pause(*(set(partitions) - remaining))
    last_progress = time.monotonic()
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=FETCH_TIMEOUT_MS)
        for tp, messages in batches.items():
            for message in messages:
                if message.offset < ends[tp]:
                    yield _dlq_record(message)
        done = {tp for tp in remaining if await consumer.position(tp) >= ends[tp]}
        consumer.pause(*done)
        remaining -= done
        if batches or done:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
            raise ReplayError(f"no progress reading {sorted(str(tp) for tp in remaining)} for {STALL_TIMEOUT_S:g} s")


def _dlq_record(message: Any) -> DlqRecord:
    return DlqRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers or ()),
    )


# --- publishing ----------------------------------------------------------------------------------------


class _Publisher:
    """Sends with a bounded window of unacknowledged records; `flush()` waits for every ack."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, namespace: str) -> None:
        self._producer = producer
        self._topic = topic
        self._namespace = namespace
        self._pending: list[Awaitable[Any]] = []
        self.acked = 0

    async def publish(self, record: DlqRecord) -> None:
        null = any(k == dlq_format.NULL_VALUE for k, _ in record.headers)
        future = await self._producer.send(
            self._topic,
            value=None if null and record.key is not None else record.value,
            key=record.key,
            headers=replay_headers(record.headers, record.derived_identifier(self._namespace)),
            timestamp_ms=record.source_timestamp_ms,
        )
        self._pending.append(future)
        if len(self._pending) >= SEND_WINDOW:
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)
        self.acked += len(pending)


async def replay(
    options: ReplayOptions, connection: KafkaConnection, *, warn: Callable[[str], None] | None = None
) -> Tally:
    """Replay the dead-letter snapshot per `options`; raise ReplayError or KafkaError on failure."""
    warn = warn or _stderr
    if options.reasons is not None and REPORT_REASON in options.reasons:
        warn(f"records with reason {REPORT_REASON} hold Stripe's error report, not an event: published as they are")
    client = connection.client_options()
    partitions, namespace = await _describe(client, options)
    tally = Tally()
    async with contextlib.AsyncExitStack() as stack:
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **client)
        stack.push_async_callback(consumer.stop)
        await consumer.start()
        publisher = None if options.dry_run else await _publisher(stack, client, options.to_topic, namespace)
        await _walk(consumer, partitions, options, tally, publisher)
        if publisher is not None:
            await publisher.flush()
            tally.published = publisher.acked
    unfixable = {r: n for r, n in sorted(tally.by_reason.items()) if r not in FIXABLE_REASONS | {REPORT_REASON}}
    if options.reasons is None and unfixable:
        counts = ", ".join(f"{reason} {count}" for reason, count in unfixable.items())
        warn(
            f"skipped records whose reason no fix outside the record can change ({counts}): replayed as they "
            "are they would be dead-lettered again; name a reason with --reason to replay it anyway"
        )
    if tally.reports_skipped:
        warn(
            f"skipped {tally.reports_skipped} records with reason {REPORT_REASON}: they hold Stripe's error "
            "report, not the event, and cannot be replayed as events (re-send those events from their source)"
        )
    return tally


async def _publisher(
    stack: contextlib.AsyncExitStack, client: dict[str, Any], topic: str, namespace: str
) -> _Publisher:
    producer = AIOKafkaProducer(enable_idempotence=True, acks="all", **client)
    stack.push_async_callback(producer.stop)
    await producer.start()
    return _Publisher(producer, topic, namespace)


async def _walk(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    options: ReplayOptions,
    tally: Tally,
    publisher: _Publisher | None,
) -> None:
    async with contextlib.aclosing(read_snapshot(consumer, partitions)) as records:
        async for record in records:
            chosen = selects(options.reasons, record.reason)
            tally.count(record, chosen)
            if chosen and publisher is not None:
                await publisher.publish(record)
            if options.limit is not None and tally.selected >= options.limit:
                return


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --- the command line --------------------------------------------------------------------------------


def _reason(text: str) -> str:
    if text not in REASONS:
        raise argparse.ArgumentTypeError(f"unknown reason {text!r}; known: {', '.join(REASONS)}")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)
    replay_parser = sub.add_parser(
        "replay",
        help="re-publish dead-lettered events to a topic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay_parser.add_argument("--to-topic", required=True, help="topic to publish the events to")
    replay_parser.add_argument(
        "--from-topic",
        help=f"dead-letter topic to read (default: ${DLQ_TOPIC_ENV} or {DEFAULT_DLQ_TOPIC})",
    )
    replay_parser.add_argument(
        "--reason",
        action="append",
        type=_reason,
        metavar="CODE",
        help=f"replay only this reason code (repeatable; default: {', '.join(sorted(FIXABLE_REASONS))})",
    )
    replay_parser.add_argument("--dry-run", action="store_true", help="publish nothing; show what would be replayed")
    replay_parser.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)"
    )
    replay_parser.add_argument("--limit", type=_positive, metavar="N", help="replay at most N records")


def options_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ReplayOptions:
    from_topic = args.from_topic or environ.get(DLQ_TOPIC_ENV, "").strip() or DEFAULT_DLQ_TOPIC
    if from_topic == args.to_topic:
        raise ReplayError("--to-topic must differ from the dead-letter topic")
    return ReplayOptions(
        from_topic=from_topic,
        to_topic=args.to_topic,
        reasons=frozenset(args.reason) if args.reason else None,
        dry_run=args.dry_run,
        limit=args.limit,
        namespace=_namespace_setting(environ),
    )


def _namespace_setting(environ: Mapping[str, str]) -> str:
    """INGESTOR_IDENTIFIER_NAMESPACE, validated as the worker does."""
    var = next(v for v in SETTINGS if v.env == cluster.NAMESPACE_ENV)
    parsed: str = var.parse(var.env, environ.get(var.env, ""))
    return parsed


async def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """`ingestor dlq replay` on the running event loop; the exit status."""
    env = os.environ if environ is None else environ
    try:
        options = options_from_args(args, env)
        connection = load_kafka(env, bootstrap_servers=args.bootstrap_servers)
        await kafka_preflight.check(connection)
        tally = await replay(options, connection)
    except (ReplayError, SettingsError, KafkaError) as exc:
        print(f"ingestor dlq replay: error: {exc}", file=sys.stderr)
        return 1
    if options.dry_run:
        _print_dry_run(tally)
    print(summary(options, tally))
    return 0


def _print_dry_run(tally: Tally) -> None:
    print("records by reason:")
    for reason, count in sorted(tally.by_reason.items()):
        print(f"  {reason}: {count}")
    if tally.first:
        print(f"first {len(tally.first)} records that would be replayed:")
    for record in tally.first:
        message = record.header(dlq_format.MESSAGE) or ""
        print(f"  {record.topic}/{record.partition}/{record.offset} {record.reason}: {message}")


def summary(options: ReplayOptions, tally: Tally) -> str:
    route = f"from {options.from_topic} to {options.to_topic}"
    skipped = tally.read - tally.selected
    if options.dry_run:
        return f"dry run: would replay {tally.selected} of {tally.read} records {route} ({skipped} skipped)"
    return f"replayed {tally.published} of {tally.read} records {route} ({skipped} skipped)"


def main(args: argparse.Namespace) -> int:
    if args.dlq_command != "replay":  # pragma: no cover - argparse only offers replay
        return 2
    return asyncio.run(run(args))
