"""`ingestor audit`: does the bill match the usage? Expected totals from the topics vs Stripe's event summaries.

Configured like the worker (KAFKA_*, INGESTOR_TOPICS, INGESTOR_DLQ_TOPIC, STRIPE_API_KEY — a restricted key
that can read meters is enough — INGESTOR_STRIPE_API_BASE, INGESTOR_API_RPS), for a range of event
timestamps `--from`/`--to` (RFC 3339 or unix seconds; `--from` rounded down and `--to` up to whole minutes,
as Stripe's summaries require):

1. Meters from `GET /v1/billing/meters` (formula, event_time_window, payload keys), the worker's catalog.
2. The dead-letter topic, whole (a snapshot): the source coordinates of every dead-lettered record, and the
   identifiers Stripe reported invalid after accepting them (`stripe_async_error`).
3. Each source partition from the offset of the first record produced at `--from` minus `--slack`
   (offsets-for-times, not a scan from the beginning) to the first produced at `--to` plus `--slack`.
   Read twice: first the cancellations (cheap: only records that look like one are parsed), then every
   record through the worker's own Decoder, into a `ingestor.ledger.Ledger`: de-duplication by identifier
   within 24 hours, cancellations, formulas, event time windows; dead-lettered records left out.
4. `GET /v1/billing/meters/{id}/event_summaries` for every (meter, customer) seen, paced at INGESTOR_API_RPS;
   with `--settle S`, the pairs that differ are read again for up to S seconds (Stripe aggregates
   asynchronously).

Exit status: 0 every total matches, 1 some differ (each named), 2 a usage, configuration or connection error.
Known limits: events produced more than `--slack` before `--from` or after `--to` are not read; a customer
billed but never seen on the topics is not found (summaries are read per customer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TextIO

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ingestor import backoff, cancellation, cluster, dlq_format, kafka_preflight
from ingestor import catalog as catalog_mod
from ingestor.adjustments import Pacer
from ingestor.clock import SYSTEM_CLOCK
from ingestor.errors import AuditError, CatalogError, Rejection, StripeUnreachable
from ingestor.events import Decoder, parse_timestamp
from ingestor.ledger import Ledger
from ingestor.replay import read_snapshot
from ingestor.settings import SettingsError, load
from ingestor.stripe_http import AiohttpTransport, StripeHttp

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ingestor.catalog import Meter
    from ingestor.settings import Settings

MINUTE: Final = 60
DEFAULT_SLACK_S: Final = 3600.0
FETCH_TIMEOUT_MS: Final = 500
FETCH_MAX_RECORDS: Final = 10_000
STALL_TIMEOUT_S: Final = 60.0
SUMMARY_ATTEMPTS: Final = 6
SUMMARY_CONCURRENCY: Final = 8
SETTLE_STEP_S: Final = 1.0
PROGRESS_EVERY_S: Final = 0.25
REPORT_REASON: Final = "stripe_async_error"


Range = dict[TopicPartition, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class AuditOptions:
    start: int
    end: int
    settle_s: float = 0.0
    slack_s: float = DEFAULT_SLACK_S
    show_all: bool = False
    as_json: bool = False


@dataclass(slots=True)
class Row:
    meter: str
    meter_id: str
    customer: str
    expected: int
    billed: int | None = None

    @property
    def matches(self) -> bool:
        return self.billed == self.expected


@dataclass(slots=True)
class Report:
    options: AuditOptions
    topics: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    records_read: int = 0
    dead_lettered: int = 0
    cancellations: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def differences(self) -> list[Row]:
        return [row for row in self.rows if not row.matches]


# --- time -------------------------------------------------------------------------------------------------


def parse_time(text: str) -> float:
    """RFC 3339 with a zone, or unix seconds."""
    raw = text.strip()
    try:
        value = float(raw)
    except ValueError:
        try:
            return parse_timestamp(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not RFC 3339 with a time zone nor unix seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}")
    return value


def aligned(start: float, end: float) -> tuple[int, int]:
    """[start, end) widened to whole minutes."""
    return int(start // MINUTE) * MINUTE, math.ceil(end / MINUTE) * MINUTE


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# --- progress ---------------------------------------------------------------------------------------------


class Progress:
    """A live line on stderr: `\\r`-rewritten on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = 0.0
        self._width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (PROGRESS_EVERY_S if self._tty else 5.0):
            return
        self._last = now
        if self._tty:
            padded = text.ljust(self._width)
            self._width = len(text)
            self._stream.write("\r" + padded)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()


# --- reading Kafka ----------------------------------------------------------------------------------------


async def describe(client: dict[str, Any], wanted: Mapping[str, str]) -> dict[str, list[int]]:
    """The partitions of each topic in `wanted` (topic -> the setting that names it); AuditError if one is missing."""
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        described = await admin.describe_topics(list(wanted))
    finally:
        await admin.close()
    found = {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described if not d["error_code"]}
    for topic, env in wanted.items():
        if not found.get(topic):
            raise AuditError(f"{env}: topic {topic!r} does not exist")
    return found


async def source_ranges(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], start_ms: int, end_ms: int
) -> Range:
    """Per source partition, [first offset produced at start_ms, first produced at end_ms) (offsets-for-times)."""
    ends = await consumer.end_offsets(partitions)
    firsts = await consumer.offsets_for_times(dict.fromkeys(partitions, start_ms))
    lasts = await consumer.offsets_for_times(dict.fromkeys(partitions, end_ms))
    ranges: Range = {}
    for tp in partitions:
        end = ends[tp] if lasts[tp] is None else min(ends[tp], lasts[tp].offset)
        begin = end if firsts[tp] is None else min(firsts[tp].offset, end)
        ranges[tp] = (begin, end)
    return ranges


async def read_ranges(
    consumer: AIOKafkaConsumer, ranges: Range, handle: Callable[[TopicPartition, list[Any]], None]
) -> None:
    """Hand every record of `ranges` to `handle`, a poll of one partition at a time, in offset order."""
    todo = {tp: span for tp, span in ranges.items() if span[0] < span[1]}
    consumer.assign(list(ranges))
    for tp, (begin, _) in todo.items():
        consumer.seek(tp, begin)
    consumer.pause(*(set(ranges) - set(todo)))
    last_progress = time.monotonic()
    while todo:
        polled = await consumer.getmany(*todo, timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS)
        for tp, records in polled.items():
            end = todo[tp][1] if tp in todo else -1
            inside = [r for r in records if r.offset < end]
            if inside:
                handle(tp, inside)
        done = {tp for tp in todo if await consumer.position(tp) >= todo[tp][1]}
        if done:
            consumer.pause(*done)
            for tp in done:
                del todo[tp]
        if polled or done:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
            raise AuditError(f"KAFKA_BOOTSTRAP_SERVERS: no progress reading {sorted(map(str, todo))}")


@dataclass(slots=True)
class DeadLetters:
    """What the dead-letter topic says was not billed."""

    coordinates: set[tuple[str, int, int]] = field(default_factory=set)
    identifiers: set[str] = field(default_factory=set)


async def read_dead_letters(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], sources: set[str]
) -> DeadLetters:
    found = DeadLetters()
    async with contextlib.aclosing(read_snapshot(consumer, partitions)) as letters:
        async for letter in letters:
            if letter.reason == REPORT_REASON:
                identifier = letter.header(dlq_format.IDENTIFIER)
                if identifier:
                    found.identifiers.add(identifier)
                continue
            source = letter.header(dlq_format.SOURCE_TOPIC)
            partition, offset = letter.header(dlq_format.SOURCE_PARTITION), letter.header(dlq_format.SOURCE_OFFSET)
            if source in sources and partition and offset and partition.isdigit() and offset.isdigit():
                found.coordinates.add((source, int(partition), int(offset)))
    return found


# --- the two passes ----------------------------------------------------------------------------------------


class Reader:
    """Both passes over the source ranges, with the progress line."""

    def __init__(self, consumer: AIOKafkaConsumer, ranges: Range, letters: DeadLetters, progress: Progress) -> None:
        self._consumer = consumer
        self._ranges = ranges
        self._letters = letters
        self._progress = progress
        self.total = sum(end - begin for begin, end in ranges.values())
        self.read = 0

    def _tick(self, what: str, count: int) -> None:
        self.read += count
        share = self.read / (2 * self.total) if self.total else 1.0
        self._progress.show(f"reading {what}: {self.read:,} of {2 * self.total:,} records ({share:.0%})")

    def _dead(self, record: Any) -> bool:
        return (record.topic, record.partition, record.offset) in self._letters.coordinates

    async def cancellations(self) -> set[str]:
        """Identifiers of the cancellations that were not dead-lettered (Stripe accepted them)."""
        cancelled: set[str] = set()

        def handle(_: TopicPartition, records: list[Any]) -> None:
            for record in records:
                value = record.value
                if value and b'"type"' in value and not self._dead(record):
                    found = _cancellation(record)
                    if found is not None:
                        cancelled.add(found)
            self._tick("cancellations (pass 1 of 2)", len(records))

        await read_ranges(self._consumer, self._ranges, handle)
        return cancelled

    async def usage(self, decoder: Decoder, ledger: Ledger) -> None:
        ignored = self._letters.identifiers

        def handle(_: TopicPartition, records: list[Any]) -> None:
            events, sources, _rejected = decoder.decode(records, records[-1].timestamp / 1000, [])
            add = ledger.add
            dead = self._letters.coordinates
            for event, record in zip(events, sources, strict=True):
                if (record.topic, record.partition, record.offset) in dead or event["identifier"] in ignored:
                    continue
                add(event, record.timestamp)
            self._tick("usage (pass 2 of 2)", len(records))

        await read_ranges(self._consumer, self._ranges, handle)


def _cancellation(record: Any) -> str | None:
    try:
        document = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        return None
    if type(document) is not dict or not cancellation.is_adjustment(document):
        return None
    try:
        return cancellation.parse(record, document).identifier
    except Rejection:
        return None


# --- Stripe -----------------------------------------------------------------------------------------------


class Summaries:
    """Billed totals from `GET /v1/billing/meters/{id}/event_summaries`, paced and retried."""

    def __init__(self, http: StripeHttp, settings: Settings, start: int, end: int) -> None:
        self._http = http
        self._pacer = Pacer(settings.effective_api_rps, SYSTEM_CLOCK)
        self._range = {"start_time": str(start), "end_time": str(end)}
        self._gate = asyncio.Semaphore(SUMMARY_CONCURRENCY)

    async def fill(self, rows: Sequence[Row]) -> None:
        await asyncio.gather(*(self._fill_one(row) for row in rows))

    async def _fill_one(self, row: Row) -> None:
        async with self._gate:
            row.billed = await self.billed(row.meter_id, row.customer)

    async def billed(self, meter_id: str, customer: str) -> int:
        path = f"/v1/billing/meters/{meter_id}/event_summaries"
        params = {"customer": customer, **self._range}
        problem = ""
        for attempt in range(1, SUMMARY_ATTEMPTS + 1):
            await self._pacer.acquire()
            try:
                reply = await self._http.request("GET", path, params=params)
            except StripeUnreachable as exc:
                problem = str(exc)
            else:
                if reply.status == 200:
                    return sum(int(s["aggregated_value"]) for s in orjson.loads(reply.body)["data"])
                error = self._http.error(reply)
                problem = " ".join(filter(None, (str(reply.status), error.code_or_type, error.message)))
                if reply.status < 500 and reply.status not in {409, 429}:
                    break
            await asyncio.sleep(backoff.delay(attempt, 0.5, 5.0, 0.5))
        raise AuditError(
            f"INGESTOR_STRIPE_API_BASE / STRIPE_API_KEY: cannot read the event summaries of meter {meter_id} "
            f"at {self._http.base_url}: {problem}"
        )


async def load_meters(http: StripeHttp) -> list[Meter]:
    try:
        found = await catalog_mod.fetch_from_stripe(http)
    except CatalogError as exc:
        raise AuditError(
            f"INGESTOR_STRIPE_API_BASE / STRIPE_API_KEY: cannot read the meters at {http.base_url}: {exc!r}"
        ) from None
    return found.meters()


# --- the audit --------------------------------------------------------------------------------------------


async def audit(settings: Settings, options: AuditOptions, *, err: TextIO = sys.stderr) -> Report:
    """Read the topics and Stripe; the report (raises AuditError, KafkaError)."""
    report = Report(options, settings.topics)
    progress = Progress(err)
    async with aiohttp.ClientSession() as session:
        http = StripeHttp(
            AiohttpTransport(session),
            settings.stripe_api_base,
            stripe_version=settings.stripe_version,
            timeout=settings.request_timeout_s,
            api_key=settings.api_key,
        )
        meters = await load_meters(http)
        ledger = await expected(settings, options, meters, report, progress)
        by_name = {m.event_name: m for m in meters}
        report.rows = [
            Row(name, by_name[name].meter_id, customer, total) for (name, customer), total in sorted(ledger.items())
        ]
        progress.show(f"reading {len(report.rows):,} event summaries from Stripe", force=True)
        summaries = Summaries(http, settings, options.start, options.end)
        await summaries.fill(report.rows)
        deadline = time.monotonic() + options.settle_s
        while report.differences and time.monotonic() < deadline:
            differing = report.differences
            progress.show(f"settling: {len(differing)} totals differ; reading them again", force=True)
            await asyncio.sleep(min(SETTLE_STEP_S, max(0.0, deadline - time.monotonic())))
            await summaries.fill(differing)
    progress.done()
    return report


async def expected(
    settings: Settings, options: AuditOptions, meters: list[Meter], report: Report, progress: Progress
) -> dict[tuple[str, str], int]:
    client = settings.kafka.client_options()
    wanted = {settings.dlq_topic: "INGESTOR_DLQ_TOPIC", **dict.fromkeys(settings.topics, "INGESTOR_TOPICS")}
    try:
        partitions = await describe(client, wanted)
        # derived identifiers (and cancellations of them) in the worker's namespace
        namespace = cluster.identifier_namespace(
            settings.identifier_namespace, (await cluster.describe(client, settings.topics)).cluster_id
        )
    except KafkaError as exc:
        where = settings.bootstrap_servers
        raise AuditError(f"KAFKA_BOOTSTRAP_SERVERS: cannot reach Kafka at {where}: {exc!r}") from None
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, isolation_level="read_committed", **client)
    await consumer.start()
    try:
        dlq = [TopicPartition(settings.dlq_topic, p) for p in partitions[settings.dlq_topic]]
        letters = await read_dead_letters(consumer, dlq, set(settings.topics))
        report.dead_lettered = len(letters.coordinates) + len(letters.identifiers)
        slack_ms = int(options.slack_s * 1000)
        sources = [TopicPartition(t, p) for t in settings.topics for p in partitions[t]]
        ranges = await source_ranges(consumer, sources, options.start * 1000 - slack_ms, options.end * 1000 + slack_ms)
        reader = Reader(consumer, ranges, letters, progress)
        cancelled = await reader.cancellations()
        report.cancellations = len(cancelled)
        catalog = catalog_mod.MeterCatalog(meters, known=True)
        ledger = Ledger(meters, options.start, options.end, cancelled)
        await reader.usage(Decoder(catalog, max_record_bytes=settings.max_record_bytes, namespace=namespace), ledger)
    finally:
        await consumer.stop()
    report.records_read = reader.total
    counts = ledger.counts
    report.counts = {
        "events": counts.events,
        "counted": counts.counted,
        "duplicates": counts.duplicates,
        "cancelled": counts.cancelled,
        "out_of_range": counts.out_of_range,
    }
    return ledger.totals()


# --- output -----------------------------------------------------------------------------------------------


def to_json(report: Report) -> dict[str, Any]:
    options = report.options
    return {
        "from": rfc3339(options.start),
        "to": rfc3339(options.end),
        "topics": list(report.topics),
        "records_read": report.records_read,
        "dead_lettered": report.dead_lettered,
        "cancellations": report.cancellations,
        **report.counts,
        "totals": [
            {
                "meter": r.meter,
                "meter_id": r.meter_id,
                "customer": r.customer,
                "expected": r.expected,
                "billed": r.billed,
                "match": r.matches,
            }
            for r in report.rows
        ],
        "differences": len(report.differences),
        "ok": not report.differences,
    }


def to_text(report: Report) -> str:
    options, counts = report.options, report.counts
    topics = ", ".join(report.topics)
    lines = [
        f"ingestor audit: events from {rfc3339(options.start)} to {rfc3339(options.end)} on {topics}",
        (
            f"read {report.records_read:,} records: {counts.get('counted', 0):,} events counted, "
            f"{counts.get('duplicates', 0):,} duplicates, {counts.get('cancelled', 0):,} cancelled, "
            f"{report.dead_lettered:,} dead-lettered records left out"
        ),
    ]
    differing = report.differences
    lines.append(
        f"{len(report.rows):,} (meter, customer) totals: {len(report.rows) - len(differing):,} match, "
        f"{len(differing):,} differ"
    )
    shown = report.rows if options.show_all else differing
    if shown:
        lines.append("")
        lines.extend(_table(shown))
    return "\n".join(lines)


def _table(rows: Sequence[Row]) -> list[str]:
    cells = [("meter", "customer", "expected", "billed", "difference", "")]
    for r in rows:
        billed = "?" if r.billed is None else f"{r.billed:,}"
        diff = "" if r.billed is None else f"{r.billed - r.expected:+,}"
        cells.append((r.meter, r.customer, f"{r.expected:,}", billed, diff, "ok" if r.matches else "DIFFERS"))
    widths = [max(len(row[i]) for row in cells) for i in range(6)]
    out = []
    for row in cells:
        left = [row[i].ljust(widths[i]) for i in (0, 1)]
        right = [row[i].rjust(widths[i]) for i in (2, 3, 4)]
        out.append("  ".join([*left, *right, row[5]]).rstrip())
    return out


# --- the command line ---------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--from", dest="start", type=parse_time, required=True, help="first event time (RFC 3339 or unix s)"
    )
    parser.add_argument("--to", dest="end", type=parse_time, help="end of the event times, exclusive (default: now)")
    parser.add_argument("--settle", type=float, default=0.0, metavar="S", help="retry differing totals for S seconds")
    parser.add_argument(
        "--slack",
        type=float,
        default=DEFAULT_SLACK_S,
        metavar="S",
        help=f"read records produced up to S seconds outside the range (default {DEFAULT_SLACK_S:g})",
    )
    parser.add_argument("--all", dest="show_all", action="store_true", help="show every total, not only differences")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print a JSON report")


def options_from_args(args: argparse.Namespace, now: float) -> AuditOptions:
    start, end = aligned(args.start, now if args.end is None else args.end)
    if end <= start:
        raise AuditError("--to must be after --from")
    if args.settle < 0 or args.slack < 0:
        raise AuditError("--settle and --slack must be at least 0")
    return AuditOptions(start, end, args.settle, args.slack, args.show_all, args.as_json)


async def run(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`ingestor audit` on the running loop; the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        options = options_from_args(args, time.time())
        settings = load(os.environ if environ is None else environ)
        await kafka_preflight.check(settings.kafka)
        report = await audit(settings, options, err=err)
    except (AuditError, SettingsError) as exc:
        print(f"ingestor audit: error: {exc}", file=err)
        return 2
    except KafkaError as exc:
        print(f"ingestor audit: error: KAFKA_BOOTSTRAP_SERVERS: {exc!r}", file=err)
        return 2
    print(orjson.dumps(to_json(report)).decode() if options.as_json else to_text(report), file=out)
    return 1 if report.differences else 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(run(args))
