"""Validation and dead-lettering end to end: real broker, the Stripe emulator, the worker in-process.

1. The corpus (every kind of bad record) and property-based fuzz values mixed into a valid stream:
   each bad record lands in the DLQ exactly once with the reason `ingestor.events.Decoder` gives (the
   oracle, with the same meter catalog), carrying the original record byte for byte; each valid one is
   billed exactly once; committed offsets reach the end of every partition.
2. A batch-level 400 from Stripe is split: the valid events are billed, the refused ones dead-lettered
   (`stripe_rejected` with Stripe's code), at a bounded cost in extra requests.
3. A DLQ topic that refuses writes holds the partition's committed offset at the bad record; nothing is
   lost and everything completes once the topic takes writes again.
4. Stripe's asynchronous error reports (signed webhooks) become DLQ records; a forged one is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ingestor import __version__, dlq_format
from ingestor import catalog as catalog_mod
from ingestor.events import Decoder
from ingestor_dev.devkafka import committed_offsets, free_port
from ingestor_dev.emulator import Emulator, EmulatorConfig
from ingestor_dev.emulator.signature import signature_header
from tests.corpus import BAD_RECORDS, DEFAULT_MAX_RECORD_BYTES, FakeRecord, event_bytes, good_event
from tests.fakes import stripe_http
from tests.integration.harness import (
    API_KEY,
    StripeApi,
    cluster_id,
    end_offsets,
    read_topic,
    running_worker,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.kafka

STREAM = "/v2/billing/meter_event_stream"
#: Meters the fuzzed events aim at: event_name -> (customer key, value key); `fz_count` counts events.
FUZZ_METERS = {
    "api_requests": ("stripe_customer_id", "value"),
    "fz_count": ("stripe_customer_id", "value"),
    "fz_custom": ("account", "units"),
}
FUZZ_CUSTOMERS = ("cus_fz_a", "cus_fz_b", "cus_fz_c")
GOOD_CUSTOMERS = ("cus_dl_0", "cus_dl_1", "cus_dl_2", "cus_dl_3")
FUZZ_EXAMPLES = 300
#: A fixed seed reproduces a failing run: INGESTOR_FUZZ_SEED=<the seed in the failure message>.
FUZZ_SEED = int(os.environ.get("INGESTOR_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


# --- records on their way in ------------------------------------------------------------------------


@dataclass
class Sent:
    """One record produced to the source topic, and what must become of it."""

    partition: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    #: dead-letter reason expected; None: the record must be billed
    reason: str | None = None
    #: what it adds to Stripe's totals when billed: (event_name, customer, amount)
    bills: tuple[str, str, int] | None = None
    label: str = ""
    offset: int = -1
    timestamp_ms: int = 0
    identifier: str = ""


async def produce_records(bootstrap: str, topic: str, records: list[Sent]) -> None:
    """Produce in order (per partition), each with its own key, headers and timestamp; fill in offsets."""
    now_ms = int(time.time() * 1000)
    for record in records:
        record.timestamp_ms = record.timestamp_ms or now_ms
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await _send(producer, topic, r) for r in records]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    for record, meta in zip(records, metadata, strict=True):
        record.offset = meta.offset


async def _send(producer: AIOKafkaProducer, topic: str, r: Sent) -> asyncio.Future[Any]:
    if r.key is None and r.value is None:  # `send` refuses a keyless tombstone; a batch of one does not
        batch = producer.create_batch()
        batch.append(key=None, value=None, timestamp=r.timestamp_ms, headers=list(r.headers))
        return await producer.send_batch(batch, topic, partition=r.partition)
    return await producer.send(
        topic, value=r.value, key=r.key, partition=r.partition, headers=list(r.headers), timestamp_ms=r.timestamp_ms
    )


def good_records(n: int, partitions: int, *, meter: str = "api_requests", tag: str = "") -> list[Sent]:
    out = []
    for i in range(n):
        customer, amount = GOOD_CUSTOMERS[i % len(GOOD_CUSTOMERS)], i % 9 + 1
        value = good_event(i, customer=customer, event_name=meter, value=amount, identifier=f"good{tag}-{i}")
        out.append(Sent(i % partitions, customer.encode(), value, bills=(meter, customer, amount), label=f"good {i}"))
    return out


def expected_totals(records: list[Sent], formulas: dict[str, str]) -> Counter[tuple[str, str]]:
    totals: Counter[tuple[str, str]] = Counter()
    for record in records:
        if record.bills is not None:
            meter, customer, amount = record.bills
            totals[meter, customer] += 1 if formulas[meter] == "count" else amount
    return totals


def wide_window() -> tuple[int, int]:
    """A summary window covering 36 days back and an hour ahead (fuzzed timestamps reach 34 days back)."""
    now = int(time.time())
    return (now - 36 * 86400) // 60 * 60, (now + 3600) // 60 * 60 + 60


async def assert_billed(api: StripeApi, meter_ids: dict[str, str], totals: Counter[tuple[str, str]]) -> None:
    start, end = wide_window()
    for (meter, customer), expected in sorted(totals.items()):
        got = await api.total(meter_ids[meter], customer, start, end)
        assert got == expected, f"{meter}/{customer}: billed {got}, expected {expected} (fuzz seed {FUZZ_SEED})"


async def wait_committed_to_end(bootstrap: str, group: str, topic: str, timeout: float = 30) -> None:
    ends = await end_offsets(bootstrap, topic)

    async def at_end() -> bool:
        return await committed_offsets(bootstrap, group, topic) == ends

    await wait_for(at_end, timeout, f"committed offsets at the end of every partition ({ends})")


async def count_in(bootstrap: str, topic: str) -> int:
    """Records a read_committed reader sees (end offsets would count transaction markers too)."""
    return len(await read_topic(bootstrap, topic))


def header_map(headers: Any) -> dict[str, bytes]:
    """The `ingestor.*` headers of a DLQ record (each must appear once)."""
    own = [(k, v) for k, v in headers if k.startswith(dlq_format.PREFIX)]
    names = [k for k, _ in own]
    assert len(names) == len(set(names)), f"repeated ingestor headers: {names}"
    return dict(own)


def parse_rfc3339(raw: bytes) -> float:
    text = raw.decode()
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text).astimezone(UTC).timestamp()


def assert_no_secret(dlq: list[Any], secrets: list[str]) -> None:
    for record in dlq:
        for name, value in record.headers:
            for secret in secrets:
                assert secret not in name, f"a secret in header name {name!r}"
                assert secret.encode() not in (value or b""), f"a secret in header {name!r}"


def assert_letter(letter: Any, sent: Sent, topic: str, *, reason: str, since: float, attempts: int = 0) -> None:
    """A DLQ record carries the original byte for byte, then the documented ingestor headers."""
    where = f"{sent.label} (offset {sent.offset}, fuzz seed {FUZZ_SEED})"
    assert letter.key == sent.key, where
    own = header_map(letter.headers)
    if sent.key is None and sent.value is None:
        # Kafka clients refuse a record with neither key nor value: an empty value and a marker instead.
        assert letter.value == b"", where
        assert own[dlq_format.NULL_VALUE] == b"true", where
    else:
        assert letter.value == sent.value, where
        assert dlq_format.NULL_VALUE not in own, where
    original = [tuple(h) for h in sent.headers]
    assert [tuple(h) for h in dlq_format.strip_own_headers(list(letter.headers))] == dlq_format.strip_own_headers(
        original
    ), where
    assert own[dlq_format.REASON].decode() == reason, f"{where}: {own[dlq_format.REASON]!r} != {reason!r}"
    assert own[dlq_format.MESSAGE], where
    assert own[dlq_format.SOURCE_TOPIC] == topic.encode(), where
    assert own[dlq_format.SOURCE_PARTITION] == str(sent.partition).encode(), where
    assert own[dlq_format.SOURCE_OFFSET] == str(sent.offset).encode(), where
    assert own[dlq_format.SOURCE_TIMESTAMP] == str(sent.timestamp_ms).encode(), where
    made = int(own[dlq_format.ATTEMPTS])
    assert made == 0 if attempts == 0 else made >= attempts, f"{where}: attempts {made}"
    first, last = parse_rfc3339(own[dlq_format.FIRST_FAILURE_AT]), parse_rfc3339(own[dlq_format.LAST_FAILURE_AT])
    assert since - 1 <= first <= last <= time.time() + 1, where
    assert own[dlq_format.VERSION] == __version__.encode(), where
    carried = next((v for k, v in original if k == dlq_format.IDENTIFIER), None)
    if sent.identifier:  # the identifier its event is billed with, also when it is replayed
        assert own.get(dlq_format.IDENTIFIER) == sent.identifier.encode(), where
    elif carried is not None:  # none can be determined: the original header, byte for byte
        assert own.get(dlq_format.IDENTIFIER) == carried, f"{where}: the original ingestor.identifier header was lost"


def by_source(dlq: list[Any]) -> dict[tuple[str, int, int], list[Any]]:
    out: dict[tuple[str, int, int], list[Any]] = {}
    for record in dlq:
        own = header_map(record.headers)
        source = (
            own[dlq_format.SOURCE_TOPIC].decode(),
            int(own[dlq_format.SOURCE_PARTITION]),
            int(own[dlq_format.SOURCE_OFFSET]),
        )
        out.setdefault(source, []).append(record)
    return out


# --- fuzzing: values drawn with hypothesis -----------------------------------------------------------


@dataclass(frozen=True)
class Uid:
    """An identifier made unique at render time (fuzzed identifiers must not collide across records)."""

    suffix: str = ""


@dataclass(frozen=True)
class Ts:
    """A timestamp relative to the time of rendering, in one of several notations."""

    offset_s: int
    form: str


@dataclass(frozen=True)
class Fuzz:
    kind: str  # "bytes" | "json" | "event" | "mangled" | "null" (a tombstone)
    body: Any
    key: bytes | None = None
    headers: tuple[tuple[str, Any], ...] = ()
    mangle: tuple[str, int, int] = ("", 0, 0)


_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
)
_JSON = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(_TEXT, c, max_size=4), max_leaves=8)
_WEIRD_VALUES = st.one_of(
    st.sampled_from(["0", "007", "-1", "1.5", "1e3", " 1", "\uff11", "1" * 16, "9" * 15, "", "+5", "12"]),
    st.integers(min_value=-10, max_value=10**16),
    _SCALARS,
)
_TIMESTAMPS = st.builds(
    Ts,
    st.sampled_from([-40 * 86400, -34 * 86400, -3600, -1, 0, 120, 3600, 10**10]),
    st.sampled_from(["iso", "iso_offset", "unix", "unix_float", "unix_ms"]),
)
_FIELDS = ("event_name", "payload", "identifier", "timestamp")


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event for one of FUZZ_METERS, then up to three mutations of it."""
    name = draw(st.sampled_from(sorted(FUZZ_METERS)))
    customer_key, value_key = FUZZ_METERS[name]
    payload: dict[str, Any] = {customer_key: draw(st.sampled_from(FUZZ_CUSTOMERS))}
    if name != "fz_count" or draw(st.booleans()):
        payload[value_key] = draw(st.integers(1, 10**6).map(str) | st.integers(1, 10**6))
    if draw(st.booleans()):
        payload["region"] = draw(st.sampled_from(["eu", "us"]))
    event: dict[str, Any] = {"event_name": name, "payload": payload}
    if draw(st.booleans()):
        event["identifier"] = Uid()
    if draw(st.booleans()):
        event["timestamp"] = draw(_TIMESTAMPS)
    for op in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        op(draw, event)
    return event


def _drop_field(draw: st.DrawFn, event: dict[str, Any]) -> None:
    event.pop(draw(st.sampled_from(_FIELDS)), None)


def _set_field(draw: st.DrawFn, event: dict[str, Any]) -> None:
    # Not the identifier (`_identifier` fuzzes it): two accepted events sharing one would be billed once.
    event[draw(st.sampled_from(_FIELDS[:2] + _FIELDS[3:]))] = draw(_JSON)


def _extra_field(draw: st.DrawFn, event: dict[str, Any]) -> None:
    event[draw(_TEXT | st.sampled_from(["customer", "livemode", "object"]))] = draw(_SCALARS)


def _event_name(draw: st.DrawFn, event: dict[str, Any]) -> None:
    event["event_name"] = draw(st.sampled_from(["fz_inactive", "nope", "", "e" * 101, "x"]) | _TEXT)


def _payload_value(draw: st.DrawFn, event: dict[str, Any]) -> None:
    payload = event.get("payload")
    if isinstance(payload, dict):
        keys = sorted({*payload, "value", "units", "stripe_customer_id", "account"})
        payload[draw(st.sampled_from(keys))] = draw(_WEIRD_VALUES)


def _drop_payload_key(draw: st.DrawFn, event: dict[str, Any]) -> None:
    payload = event.get("payload")
    if isinstance(payload, dict) and payload:
        payload.pop(draw(st.sampled_from(sorted(payload))))


def _identifier(draw: st.DrawFn, event: dict[str, Any]) -> None:
    event["identifier"] = draw(
        st.builds(Uid, _TEXT)
        | st.sampled_from(["", "i" * 101])
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what JSON encoders write
        | st.none()
        | st.builds(Uid, st.just("z" * 95))
    )


def _timestamp(draw: st.DrawFn, event: dict[str, Any]) -> None:
    event["timestamp"] = draw(_TIMESTAMPS | _SCALARS | st.sampled_from(["yesterday", "2026-02-30T00:00:00Z"]))


MUTATIONS = (
    _drop_field,
    _set_field,
    _extra_field,
    _event_name,
    _payload_value,
    _drop_payload_key,
    _identifier,
    _timestamp,
)

_HEADER_NAMES = st.sampled_from(["trace", "source", "x-\u00e9", ""]) | _TEXT.filter(
    lambda k: not k.startswith(dlq_format.PREFIX)
)
_USER_HEADERS = st.lists(st.tuples(_HEADER_NAMES, st.binary(max_size=16)), max_size=3)
_ID_HEADER = st.sampled_from([None, Uid("h"), b"h" * 101, b"\xff\xfe", b""])


@st.composite
def fuzz_items(draw: st.DrawFn) -> Fuzz:
    kind = draw(st.sampled_from(["bytes", "json", "event", "event", "mangled", "null"]))
    body: Any = None
    if kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "json":
        body = draw(_JSON)
    elif kind != "null":
        body = draw(mutated_events())
    headers = list(draw(_USER_HEADERS))
    id_header = draw(_ID_HEADER)
    if id_header is not None:
        headers.insert(draw(st.integers(0, len(headers))), (dlq_format.IDENTIFIER, id_header))
    mangle = ("", 0, 0)
    if kind == "mangled":
        mangle = (
            draw(st.sampled_from(["truncate", "flip", "insert"])),
            draw(st.integers(0, 10**6)),
            draw(st.integers(0, 255)),
        )
    return Fuzz(kind, body, draw(st.none() | st.binary(max_size=12)), tuple(headers), mangle)


def draw_fuzz(n: int, seed_value: int) -> list[Fuzz]:
    """`n` values drawn by hypothesis (generation only: every value is used, none is a failure to shrink)."""
    drawn: list[Fuzz] = []

    @seed(seed_value)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_items())
    def collect(item: Fuzz) -> None:
        drawn.append(item)

    collect()
    return drawn


def _render_ts(ts: Ts, now: float) -> Any:
    moment = now + ts.offset_s
    numeric = {"unix": int(moment), "unix_float": round(moment, 3), "unix_ms": int(moment * 1000)}
    if ts.form in numeric:
        return numeric[ts.form]
    try:
        when = datetime.fromtimestamp(moment, UTC)
    except (OverflowError, ValueError, OSError):
        return "9999-12-31T23:59:59Z"
    if ts.form == "iso_offset":
        return when.astimezone(timezone(timedelta(hours=2))).isoformat()
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _uid(index: int, suffix: str = "") -> str:
    """Unique per record, even after a byte of the value is mangled (the index alone is not: fz16 -> fz17)."""
    tag = hashlib.sha256(f"{FUZZ_SEED}-{index}".encode()).hexdigest()[:8]
    return f"fz{index}.{tag}-{suffix}" if suffix else f"fz{index}.{tag}"


def _render_value(obj: Any, index: int, now: float) -> Any:
    if isinstance(obj, Uid):
        return _uid(index, obj.suffix)
    if isinstance(obj, Ts):
        return _render_ts(obj, now)
    if isinstance(obj, dict):
        return {k: _render_value(v, index, now) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_render_value(v, index, now) for v in obj]
    return obj


def render(item: Fuzz, index: int, now: float) -> tuple[bytes | None, tuple[tuple[str, bytes], ...]]:
    """The record value and headers of a fuzz item (identifiers made unique with `index`)."""
    headers = tuple((k, _uid(index, "h").encode() if isinstance(v, Uid) else v) for k, v in item.headers)
    if item.kind in ("bytes", "null"):
        return item.body, headers
    value = orjson.dumps(_render_value(item.body, index, now))
    op, position, byte = item.mangle
    if op and value:
        at = position % len(value)
        if op == "truncate":
            value = value[:at]
        elif op == "flip":
            value = value[:at] + bytes([byte]) + value[at + 1 :]
        else:
            value = value[:at] + bytes([byte]) + value[at:]
    return value, headers


def oracle(decoder: Decoder, sent: Sent, topic: str, now: float) -> None:
    """Set `sent.reason` or `sent.bills` (and `identifier`) from the worker's own decoder."""
    record = FakeRecord(topic, sent.partition, sent.offset, sent.timestamp_ms, sent.key, sent.value, sent.headers)
    events, _, rejected = decoder.decode([record], now)
    if rejected:
        sent.reason = rejected[0][1].reason
        sent.identifier = decoder.identifier_of(record)
        return
    event = events[0]
    meter = decoder.catalog.lookup(event["event_name"])
    payload = event["payload"]
    amount = int(payload[meter.value_key]) if meter.needs_value else 1
    sent.bills = (event["event_name"], payload[meter.customer_key], amount)
    sent.identifier = event["identifier"]


# --- 1. corpus and fuzz ---------------------------------------------------------------------------------


async def create_catalog_meters(api: StripeApi) -> tuple[dict[str, str], dict[str, str]]:
    """Meters for the corpus and the fuzz values; ids and formulas by event_name."""
    ids = {
        "api_requests": await api.create_meter("api_requests", "sum"),
        "x": await api.create_meter("x", "sum"),
        "fz_count": await api.create_meter("fz_count", "count"),
        "fz_custom": await api.create_meter(
            "fz_custom",
            "sum",
            **{
                "customer_mapping[type]": "by_id",
                "customer_mapping[event_payload_key]": "account",
                "value_settings[event_payload_key]": "units",
            },
        ),
        "fz_inactive": await api.create_meter("fz_inactive", "sum"),
    }
    await api.deactivate_meter(ids["fz_inactive"])
    formulas = {"api_requests": "sum", "x": "sum", "fz_count": "count", "fz_custom": "sum", "fz_inactive": "sum"}
    return ids, formulas


@pytest.mark.timeout(180)
async def test_corpus_and_fuzzed_records_are_dead_lettered_once_with_the_decoders_reason(
    kafka_bootstrap, topic_factory
):
    started = time.time()
    partitions = 3
    topic = await topic_factory(partitions, "dl-mix")
    dlq = await topic_factory(1, "dl-mix-dlq")
    rng = random.Random(FUZZ_SEED)
    fuzz = await asyncio.to_thread(draw_fuzz, FUZZ_EXAMPLES, FUZZ_SEED)
    assert len(fuzz) >= FUZZ_EXAMPLES * 0.9
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_ids, formulas = await create_catalog_meters(api)
        async with stripe_http(emu.url, api_key=API_KEY) as http:
            catalog = await catalog_mod.fetch_from_stripe(http)
        namespace = await cluster_id(kafka_bootstrap)
        decoder = Decoder(catalog, max_record_bytes=DEFAULT_MAX_RECORD_BYTES, namespace=namespace)

        now = time.time()
        now_ms = int(now * 1000)
        corpus = [
            Sent(i % partitions, bad.key, bad.value, bad.headers, reason=bad.reason, label=f"corpus {bad.name}")
            for i, bad in enumerate(BAD_RECORDS)
        ]
        # With a known catalog, two more kinds: an unknown and a deactivated meter.
        corpus += [
            Sent(0, None, event_bytes(event_name="no_such_meter"), reason="meter_unknown", label="meter unknown"),
            Sent(1, None, event_bytes(event_name="fz_inactive"), reason="meter_inactive", label="meter inactive"),
            Sent(2, None, None, reason="tombstone", label="keyless tombstone"),
        ]
        assert len({bad.name for bad in BAD_RECORDS}) >= 25
        assert len({sent.reason for sent in corpus}) >= 21
        fuzzed = []
        for i, item in enumerate(fuzz):
            value, headers = render(item, i, now)
            fuzzed.append(Sent(rng.randrange(partitions), item.key, value, headers, label=f"fuzz {i} {item!r}"[:400]))
        good = good_records(600, partitions)
        records = corpus + fuzzed + good
        rng.shuffle(records)
        for record in records:
            record.timestamp_ms = now_ms
        await produce_records(kafka_bootstrap, topic, records)
        # The corpus's reasons hold with this catalog too (it knows the meters the corpus names).
        for sent in corpus:
            probe = Sent(sent.partition, sent.key, sent.value, sent.headers, offset=sent.offset)
            probe.timestamp_ms = sent.timestamp_ms
            oracle(decoder, probe, topic, now)
            assert probe.reason == sent.reason, f"{sent.label}: the decoder says {probe.reason}"
            sent.identifier = probe.identifier
        for sent in fuzzed:
            oracle(decoder, sent, topic, now)
        bad = [r for r in records if r.reason is not None]
        billed = [r for r in records if r.bills is not None]
        assert len(bad) + len(billed) == len(records)
        identifiers = [r.identifier for r in fuzzed if r.bills is not None] + [
            orjson.loads(r.value or b"")["identifier"] for r in good
        ]
        assert len(set(identifiers)) == len(identifiers), f"fuzzed identifiers collide (seed {FUZZ_SEED})"
        fuzz_reasons = Counter(r.reason for r in fuzzed if r.reason)
        # The fuzz reaches both outcomes and many reasons (not only "not_json").
        assert sum(1 for r in fuzzed if r.bills) >= 10, fuzz_reasons
        assert len(fuzz_reasons) >= 8, fuzz_reasons

        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_DLQ_TOPIC=dlq)
        async with running_worker(env) as worker:

            async def done() -> bool:
                stats = await api.stats()
                return stats["events_accepted"] >= len(billed) and await count_in(kafka_bootstrap, dlq) >= len(bad)

            await wait_for(done, 60, f"{len(billed)} billed and {len(bad)} dead-lettered (fuzz seed {FUZZ_SEED})")
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
            tokens = list(emu.state.sessions.by_token)
            assert worker.dead_letters is not None
            assert worker.dead_letters.backlog == 0
        stats = await api.stats()
        letters = await read_topic(kafka_bootstrap, dlq)
        failures = (await api._call("GET", "/_emulator/errors"))["data"]
        await assert_billed(api, meter_ids, expected_totals(records, formulas))

    assert stats["events_accepted"] == stats["unique_identifiers"] == len(billed)
    assert failures == [], f"accepted events failed Stripe's validation: {failures[:5]}"
    assert len(letters) == len(bad)
    found = by_source(letters)
    expected_sources = {(topic, r.partition, r.offset): r for r in bad}
    assert set(found) == set(expected_sources)
    for source, copies in found.items():
        assert len(copies) == 1, f"{expected_sources[source].label} dead-lettered {len(copies)} times"
        sent = expected_sources[source]
        assert sent.reason is not None
        assert_letter(copies[0], sent, topic, reason=sent.reason, since=started)
    assert_no_secret(letters, [API_KEY, *tokens])
    # Every corpus kind, and what the fuzz produced, in the DLQ with its reason.
    got = Counter(header_map(r.headers)[dlq_format.REASON].decode() for r in letters)
    assert got == Counter(r.reason for r in bad)


# --- 2. a batch-level 400 -------------------------------------------------------------------------------


@pytest.mark.parametrize("names_index", [False, True], ids=["bisect", "named"])
async def test_a_batch_refused_with_400_is_split_bad_events_dead_lettered_the_rest_billed(
    kafka_bootstrap, topic_factory, names_index
):
    started = time.time()
    topic = await topic_factory(2, "dl-400")
    dlq = await topic_factory(1, "dl-400-dlq")
    records = good_records(400, 2)
    # Events the worker's own validation accepts, that the stream refuses synchronously.
    poison_at = [3, 57, 58, 150, 271, 399]
    for n, at in enumerate(poison_at):
        customer = GOOD_CUSTOMERS[0]
        records.insert(
            at,
            Sent(
                at % 2,
                b"poison",
                good_event(n, customer=customer, event_name="api_requests", value=1000, identifier=f"poison-{n}"),
                (("trace", b"\x00\x01"),),
                reason="stripe_rejected",
                label=f"poison {n}",
                identifier=f"poison-{n}",
            ),
        )
    await produce_records(kafka_bootstrap, topic, records)
    k = len(poison_at)
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter("api_requests", "sum")
        await api.set_faults(reject_identifiers="^poison-", reject_names_index=names_index)
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_DLQ_TOPIC=dlq)
        good = [r for r in records if r.bills]
        async with running_worker(env) as worker:

            async def done() -> bool:
                return (await api.stats())["events_accepted"] >= len(good) and await count_in(kafka_bootstrap, dlq) >= k

            await wait_for(done, 60, "valid events billed and refused ones dead-lettered")
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
            sample = worker.metrics.registry.get_sample_value
            bisections = sample("ingestor_bisections_total") or 0.0
            retries = sum(
                sample("ingestor_retries_total", {"cause": c}) or 0.0
                for c in ("server_error", "rate_limited", "lock_timeout", "conflict", "timeout", "connection_error")
            )
        stats = await api.stats()
        letters = await read_topic(kafka_bootstrap, dlq)
        await assert_billed(api, {"api_requests": meter_id}, expected_totals(records, {"api_requests": "sum"}))

    assert stats["events_accepted"] == stats["unique_identifiers"] == len(good)
    assert retries == 0
    refused = int(stats["requests"][STREAM].get("400", 0))
    ok = int(stats["requests"][STREAM].get("200", 0))
    # Every 400 either split a batch or dead-lettered one event: nothing else is refused.
    assert refused == bisections + k
    assert bisections > 0
    # Bounded cost: each bad event costs at most ceil(log2(100)) splits when halving, one when named.
    assert bisections <= (k if names_index else k * math.ceil(math.log2(100)))
    batches = ok + refused - 2 * bisections  # the requests the batches needed without any split
    assert batches >= math.ceil(len(good) / 100)
    assert len(letters) == k
    sent_by_source = {(topic, r.partition, r.offset): r for r in records if r.reason}
    for source, copies in by_source(letters).items():
        assert len(copies) == 1
        sent = sent_by_source[source]
        assert_letter(copies[0], sent, topic, reason="stripe_rejected", since=started, attempts=1)
        own = header_map(copies[0].headers)
        assert own[dlq_format.STRIPE_CODE] == b"parameter_invalid"
        assert own[dlq_format.IDENTIFIER] == sent.identifier.encode()


# --- 3. the DLQ topic refuses writes for a while -----------------------------------------------------


async def set_topic_config(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
        assert all(error_code == 0 for error_code, *_ in response.resources), response
    finally:
        await admin.close()


async def test_an_unwritable_dlq_holds_the_commit_at_the_bad_record_and_recovers(kafka_bootstrap, topic_factory):
    started = time.time()
    topic = await topic_factory(2, "dl-stuck")
    # Every dead-letter write fails (MessageSizeTooLarge) until the limit is raised.
    dlq = await topic_factory(1, "dl-stuck-dlq", config={"max.message.bytes": "100"})
    before = [Sent(0, b"k", r.value, bills=r.bills, label=r.label) for r in good_records(50, 1, tag="a")]
    after = [Sent(0, b"k", r.value, bills=r.bills, label=r.label) for r in good_records(50, 1, tag="b")]
    other = [Sent(1, b"k", r.value, bills=r.bills, label=r.label) for r in good_records(100, 1, tag="c")]
    bad = Sent(
        0,
        b"bad-key",
        b'{"event_name":"api_requests","payload":{"stripe_customer_id":"cus_dl_0","value":"1.5"}}',
        (("trace", b"abc"),),
        reason="value_invalid",
        label="bad",
    )
    records = [*before, bad, *after, *other]
    await produce_records(kafka_bootstrap, topic, records)
    good = [r for r in records if r.bills]
    async with Emulator(EmulatorConfig(stream_rps_limit=0), host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter("api_requests", "sum")
        env = worker_env(kafka_bootstrap, topic, emu.url, INGESTOR_DLQ_TOPIC=dlq)
        group = env["INGESTOR_GROUP_ID"]
        async with running_worker(env) as worker:
            sample = worker.metrics.registry.get_sample_value

            async def stuck() -> bool:
                accepted = (await api.stats())["events_accepted"] >= len(good)
                return accepted and (sample("ingestor_dlq_write_failures_total") or 0) > 0

            await wait_for(stuck, 30, "valid events delivered while the DLQ refuses writes")
            # Partition 1 (no bad record) commits to its end; partition 0 stays at the bad record.
            await wait_for(
                lambda: _committed_is(kafka_bootstrap, group, topic, 1, len(other)), 20, "partition 1 committed"
            )
            for _ in range(3):  # several commit intervals
                await asyncio.sleep(0.5)
                committed = await committed_offsets(kafka_bootstrap, group, topic)
                assert committed.get(0, 0) <= bad.offset, committed
            assert worker.dead_letters is not None
            assert worker.dead_letters.backlog > 0 or worker.dead_letters.failing
            assert await count_in(kafka_bootstrap, dlq) == 0
            failures_while_stuck = sample("ingestor_dlq_write_failures_total")

            await set_topic_config(kafka_bootstrap, dlq, {"max.message.bytes": "1048576"})
            await wait_committed_to_end(kafka_bootstrap, group, topic, timeout=40)
            assert worker.dead_letters.backlog == 0
        letters = await read_topic(kafka_bootstrap, dlq)
        stats = await api.stats()
        await assert_billed(api, {"api_requests": meter_id}, expected_totals(records, {"api_requests": "sum"}))
    assert failures_while_stuck is not None
    assert failures_while_stuck > 0
    assert stats["events_accepted"] == stats["unique_identifiers"] == len(good)
    assert len(letters) == 1
    assert_letter(letters[0], bad, topic, reason="value_invalid", since=started)


async def _committed_is(bootstrap: str, group: str, topic: str, partition: int, offset: int) -> bool:
    return (await committed_offsets(bootstrap, group, topic)).get(partition) == offset


# --- 4. asynchronous error reports through the webhook ---------------------------------------------------


async def test_error_report_webhooks_become_dlq_records_and_a_forged_one_is_refused(kafka_bootstrap, topic_factory):
    topic = await topic_factory(2, "dl-hook")
    dlq = await topic_factory(1, "dl-hook-dlq")
    port = free_port()
    secret = "whsec_deadLetterTest0000000000"
    known = "cus_known"
    records = [
        Sent(
            i % 2,
            None,
            good_event(i, customer=known, event_name="api_requests", value=2),
            bills=("api_requests", known, 2),
        )
        for i in range(40)
    ]
    strangers = [f"cus_unknown_{i}" for i in range(5)]
    unknown_ids = [f"stranger-{i}" for i in range(5)]
    for i, customer in enumerate(strangers):
        value = good_event(i, customer=customer, event_name="api_requests", value=3, identifier=unknown_ids[i])
        records.insert(i * 7, Sent(i % 2, None, value, label=f"stranger {i}"))
    await produce_records(kafka_bootstrap, topic, records)
    config = EmulatorConfig(
        stream_rps_limit=0,
        customers={known},
        webhook_url=f"http://127.0.0.1:{port}/webhooks/stripe",
        webhook_secret=secret,
    )
    async with Emulator(config, host="127.0.0.1", port=0) as emu:
        api = StripeApi(emu.url)
        meter_id = await api.create_meter("api_requests", "sum")
        env = worker_env(
            kafka_bootstrap,
            topic,
            emu.url,
            INGESTOR_DLQ_TOPIC=dlq,
            INGESTOR_WEBHOOK_PORT=str(port),
            STRIPE_WEBHOOK_SECRET=secret,
        )
        async with running_worker(env) as worker:
            assert worker.webhook_port == port

            async def reported() -> bool:
                return await count_in(kafka_bootstrap, dlq) >= len(strangers)

            await wait_for(reported, 30, "the error reports written to the DLQ")
            await wait_committed_to_end(kafka_bootstrap, env["INGESTOR_GROUP_ID"], topic)
            await emu.wait_webhooks()
            stats = await api.stats()
            tokens = list(emu.state.sessions.by_token)

            # A forged report (right shape, wrong secret) and an unsigned one are refused; nothing is written.
            report = (await api._call("GET", "/_emulator/error_reports"))["data"][0]
            forged = dict(report, id="mtrerr_forged")
            forged["reason"] = {
                "error_count": 1,
                "error_types": [
                    {
                        "code": "meter_event_customer_not_found",
                        "error_count": 1,
                        "sample_errors": [{"error_message": "forged", "request": {"identifier": "good-0"}}],
                    }
                ],
            }
            body = orjson.dumps(
                {"id": "evt_forged", "object": "event", "type": report["type"], "data": {"object": forged}}
            ).decode()
            url = f"http://127.0.0.1:{port}/webhooks/stripe"
            headers = {"Content-Type": "application/json"}
            async with aiohttp.ClientSession() as http:
                wrong = {**headers, "Stripe-Signature": signature_header(body, "whsec_notTheSecret", int(time.time()))}
                async with http.post(url, data=body.encode(), headers=wrong) as resp:
                    assert resp.status == 400
                    assert (await resp.json())["outcome"] == "bad_signature"
                async with http.post(url, data=body.encode(), headers=headers) as resp:
                    assert resp.status == 400
                # The right secret over a different body does not pass either.
                signed = signature_header(body, secret, int(time.time()))
                tampered = body.replace("forged", "forgeD").encode()
                async with http.post(url, data=tampered, headers={**headers, "Stripe-Signature": signed}) as resp:
                    assert resp.status == 400
            await asyncio.sleep(0.5)
            assert await count_in(kafka_bootstrap, dlq) == len(strangers)
        letters = await read_topic(kafka_bootstrap, dlq)
        await assert_billed(api, {"api_requests": meter_id}, expected_totals(records, {"api_requests": "sum"}))

    assert stats["webhooks_sent"] >= 1
    assert stats["webhooks_failed"] == 0
    assert sorted(r.key.decode() for r in letters) == sorted(unknown_ids)
    for letter in letters:
        own = header_map(letter.headers)
        assert own[dlq_format.REASON] == b"stripe_async_error"
        assert own[dlq_format.STRIPE_CODE] == b"meter_event_customer_not_found"
        assert own[dlq_format.IDENTIFIER] == letter.key
        assert own[dlq_format.VERSION] == __version__.encode()
        assert own[dlq_format.MESSAGE]
        value = orjson.loads(letter.value)
        assert value["identifier"] == letter.key.decode()
        assert value["event_id"].startswith("evt_")
        assert value["meter"] == meter_id
    assert_no_secret(letters, [API_KEY, secret, *tokens])
