"""`ingestor dlq replay`: the pure filter and header rules, then real replays on the local Kafka broker."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from ingestor import dlq_format, replay
from ingestor.cli import build_parser
from ingestor.settings import SettingsError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

Headers = list[tuple[str, bytes]]
Record = tuple[bytes | None, bytes | None, Headers]


SOURCE_TIMESTAMP_MS = 1_700_000_000_123


def dlq_headers(reason: str | None, identifier: str | None = None, message: str = "it failed") -> Headers:
    headers: Headers = []
    if reason is not None:
        headers.append((dlq_format.REASON, reason.encode()))
    headers += [
        (dlq_format.MESSAGE, message.encode()),
        (dlq_format.SOURCE_TOPIC, b"events"),
        (dlq_format.SOURCE_TIMESTAMP, str(SOURCE_TIMESTAMP_MS).encode()),
    ]
    if identifier is not None:
        headers.append((dlq_format.IDENTIFIER, identifier.encode()))
    return headers


def dead(key: bytes | None, value: bytes | None, reason: str | None, **kw: Any) -> Record:
    """A dead-letter record: original headers first, then ingestor's."""
    original: Headers = kw.pop("original", [("trace", b"t-1")])
    return key, value, original + dlq_headers(reason, **kw)


# --- pure parts -------------------------------------------------------------------------------------


def test_default_selection_is_every_reason_holding_an_event() -> None:
    assert replay.selects(None, "not_json")
    assert replay.selects(None, "some_future_reason")
    assert not replay.selects(None, "stripe_async_error")
    assert not replay.selects(None, replay.NO_REASON)
    assert replay.selects(frozenset({"stripe_async_error"}), "stripe_async_error")
    assert not replay.selects(frozenset({"meter_unknown"}), "not_json")


def test_replay_headers_keep_the_originals_and_the_identifier() -> None:
    headers = (("a", b"1"), (dlq_format.REASON, b"x"), ("a", b"2"), (dlq_format.IDENTIFIER, b"id-9"), ("b", b""))
    assert replay.replay_headers(headers) == [("a", b"1"), ("a", b"2"), ("b", b""), (dlq_format.IDENTIFIER, b"id-9")]
    assert replay.replay_headers((("a", b"1"), (dlq_format.REASON, b"x"))) == [("a", b"1")]


def test_source_timestamp_is_read_from_its_header() -> None:
    def record(*headers: tuple[str, bytes]) -> replay.DlqRecord:
        return replay.DlqRecord("dlq", 0, 0, None, None, headers)

    assert record((dlq_format.SOURCE_TIMESTAMP, b"1700000000123")).source_timestamp_ms == 1_700_000_000_123
    assert record().source_timestamp_ms is None
    assert record((dlq_format.SOURCE_TIMESTAMP, b"-1")).source_timestamp_ms is None
    assert record((dlq_format.SOURCE_TIMESTAMP, b"\xff")).source_timestamp_ms is None


def test_load_kafka_reads_only_kafka_variables(tmp_path: Path) -> None:
    assert replay.load_kafka({"KAFKA_BOOTSTRAP_SERVERS": "k:9092"}) == replay.KafkaConnection("k:9092")
    assert replay.load_kafka({}, bootstrap_servers="o:1").bootstrap_servers == "o:1"
    with pytest.raises(SettingsError, match="KAFKA_BOOTSTRAP_SERVERS"):
        replay.load_kafka({})
    with pytest.raises(SettingsError, match="KAFKA_SECURITY_PROTOCOL"):
        replay.load_kafka({"KAFKA_BOOTSTRAP_SERVERS": "k", "KAFKA_SECURITY_PROTOCOL": "TLS"})
    with pytest.raises(SettingsError, match="KAFKA_SASL_USERNAME"):
        replay.load_kafka({"KAFKA_BOOTSTRAP_SERVERS": "k", "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "k",
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "user",
        "KAFKA_SASL_PASSWORD_FILE": str(secret),
    }
    connection = replay.load_kafka(env)
    assert "s3cret" not in repr(connection)
    options = connection.client_options()
    assert options["sasl_plain_password"] == "s3cret"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"


def parse(*argv: str) -> Any:
    args = ["dlq", "replay", *argv]
    return build_parser(args).parse_args(args)


def test_command_line_options() -> None:
    args = parse("--to-topic", "events", "--reason", "not_json", "--reason", "meter_unknown", "--limit", "5")
    options = replay.options_from_args(args, {"INGESTOR_DLQ_TOPIC": "my.dlq"})
    assert options == replay.ReplayOptions(
        "my.dlq", "events", frozenset({"not_json", "meter_unknown"}), dry_run=False, limit=5
    )
    assert replay.options_from_args(parse("--to-topic", "events"), {}).from_topic == "ingestor.dlq"
    with pytest.raises(replay.ReplayError, match="differ"):
        replay.options_from_args(parse("--to-topic", "ingestor.dlq"), {})
    for bad in (["--reason", "nope"], ["--limit", "0"]):
        with pytest.raises(SystemExit):
            parse("--to-topic", "events", *bad)


# --- on the real broker -----------------------------------------------------------------------------


async def produce_records(bootstrap: str, topic: str, records: Sequence[Record], partitions: int = 1) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sends = [
            await producer.send(topic, value=v, key=k, headers=h, partition=i % partitions)
            for i, (k, v, h) in enumerate(records)
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, partitions: int = 1) -> list[Record]:
    return [(m.key, m.value, list(m.headers)) for m in await read_messages(bootstrap, topic, partitions)]


async def read_messages(bootstrap: str, topic: str, partitions: int = 1) -> list[Any]:
    """Every record of `topic`, by partition then offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        found: list[Any] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(messages)
    finally:
        await consumer.stop()
    found.sort(key=lambda m: (m.partition, m.offset))
    return found


async def run_replay(bootstrap: str, *argv: str) -> int:
    return await replay.run(parse("--bootstrap-servers", bootstrap, *argv), environ={})


MIXED: list[Record] = [
    dead(b"k1", b'{"event_name": "a"}', "meter_unknown", identifier="id-1"),
    dead(b"k2", b"not json at all", "not_json"),
    dead(b"k3", b'{"identifier": "id-3", "code": "no_meter"}', "stripe_async_error", identifier="id-3"),
    dead(b"k4", b'{"event_name": "b"}', "meter_unknown", identifier="id-4"),
    dead(b"k5", b"plain", None),
]


@pytest.fixture
def topics(topic_factory: Callable[..., Any]) -> Callable[[int], Any]:
    async def create(partitions: int = 1) -> tuple[str, str]:
        return await topic_factory(partitions, "dlq"), await topic_factory(1, "events")

    return create


@pytest.mark.kafka
async def test_filter_by_reason(kafka_bootstrap: str, topics: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dlq, events = await topics(3)
    await produce_records(kafka_bootstrap, dlq, MIXED, partitions=3)
    status = await run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", events, "--reason", "meter_unknown")
    assert status == 0
    assert sorted(k for k, _, _ in await read_all(kafka_bootstrap, events)) == [b"k1", b"k4"]
    assert f"replayed 2 of 5 records from {dlq} to {events} (3 skipped)" in capsys.readouterr().out


@pytest.mark.kafka
async def test_default_replays_every_event_reason_and_skips_reports(
    kafka_bootstrap: str, topics: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dlq, events = await topics(1)
    await produce_records(kafka_bootstrap, dlq, MIXED)
    assert await run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", events) == 0
    assert [k for k, _, _ in await read_all(kafka_bootstrap, events)] == [b"k1", b"k2", b"k4"]
    captured = capsys.readouterr()
    assert "skipped 1 records with reason stripe_async_error" in captured.err
    assert "cannot be replayed as events" in captured.err


@pytest.mark.kafka
async def test_reports_are_published_only_when_asked_for(
    kafka_bootstrap: str, topics: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dlq, events = await topics(1)
    await produce_records(kafka_bootstrap, dlq, MIXED)
    argv = ("--from-topic", dlq, "--to-topic", events, "--reason", "stripe_async_error")
    assert await run_replay(kafka_bootstrap, *argv) == 0
    assert [k for k, _, _ in await read_all(kafka_bootstrap, events)] == [b"k3"]
    assert "hold Stripe's error report" in capsys.readouterr().err


@pytest.mark.kafka
async def test_dry_run_publishes_nothing(kafka_bootstrap: str, topics: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dlq, events = await topics(1)
    await produce_records(kafka_bootstrap, dlq, MIXED)
    assert await run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", events, "--dry-run") == 0
    assert await read_all(kafka_bootstrap, events) == []
    out = capsys.readouterr().out
    assert "  meter_unknown: 2\n" in out
    assert "  not_json: 1\n" in out
    assert "  stripe_async_error: 1\n" in out
    assert f"  {dlq}/0/0 meter_unknown: it failed\n" in out
    assert f"  {dlq}/0/1 not_json: it failed\n" in out
    assert f"dry run: would replay 3 of 5 records from {dlq} to {events} (2 skipped)" in out


@pytest.mark.kafka
async def test_original_bytes_headers_and_identifier_are_kept(kafka_bootstrap: str, topics: Any) -> None:
    dlq, events = await topics(1)
    binary = bytes(range(256))
    originals: Headers = [("trace", b"\x00\xff"), ("trace", b"second"), ("empty", b"")]
    records = [
        dead(binary, binary[::-1], "not_utf8", identifier="id-bin", original=originals),
        dead(None, b"{}", "event_name_missing", original=[]),
        dead(b"tomb", None, "tombstone", original=[("x", b"y")], identifier="id-tomb"),
    ]
    await produce_records(kafka_bootstrap, dlq, records)
    # Tombstones are skipped by default (never billable); name every reason to copy all three.
    reasons = ["--reason", "not_utf8", "--reason", "event_name_missing", "--reason", "tombstone"]
    assert await run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", events, *reasons) == 0
    replayed = await read_messages(kafka_bootstrap, events)
    assert [m.timestamp for m in replayed] == [SOURCE_TIMESTAMP_MS] * 3
    assert [(m.key, m.value, list(m.headers)) for m in replayed] == [
        (binary, binary[::-1], [*originals, (dlq_format.IDENTIFIER, b"id-bin")]),
        (None, b"{}", []),
        (b"tomb", None, [("x", b"y"), (dlq_format.IDENTIFIER, b"id-tomb")]),
    ]


@pytest.mark.kafka
async def test_limit(kafka_bootstrap: str, topics: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dlq, events = await topics(1)
    await produce_records(kafka_bootstrap, dlq, MIXED)
    assert await run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", events, "--limit", "2") == 0
    assert [k for k, _, _ in await read_all(kafka_bootstrap, events)] == [b"k1", b"k2"]
    assert "replayed 2 of 2 records" in capsys.readouterr().out


@pytest.mark.kafka
async def test_empty_dlq_and_missing_topic(
    kafka_bootstrap: str, topics: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dlq, events = await topics(2)
    assert await run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", events) == 0
    assert "replayed 0 of 0 records" in capsys.readouterr().out
    assert await run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", "no-such-topic-x") == 1
    assert "topic 'no-such-topic-x' does not exist" in capsys.readouterr().err


@pytest.mark.kafka
async def test_reading_stops_at_the_snapshot(kafka_bootstrap: str, topics: Any) -> None:
    dlq, _ = await topics(2)
    early = [dead(f"e{i}".encode(), b"{}", "not_json") for i in range(50)]
    await produce_records(kafka_bootstrap, dlq, early, partitions=2)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(dlq, 0), TopicPartition(dlq, 1)]
        seen: list[bytes | None] = []
        async with contextlib.aclosing(replay.read_snapshot(consumer, tps)) as records:
            async for record in records:
                if not seen:  # the snapshot is taken: more records arrive while reading
                    late = [dead(f"l{i}".encode(), b"{}", "not_json") for i in range(50)]
                    await produce_records(kafka_bootstrap, dlq, late, partitions=2)
                seen.append(record.key)
    finally:
        await consumer.stop()
    assert sorted(seen) == sorted(k for k, _, _ in early)


@pytest.mark.kafka
async def test_replay_ends_while_the_dlq_keeps_growing(kafka_bootstrap: str, topics: Any) -> None:
    dlq, events = await topics(2)
    early = [dead(f"e{i}".encode(), b"{}", "not_json") for i in range(200)]
    await produce_records(kafka_bootstrap, dlq, early, partitions=2)
    stop = asyncio.Event()

    async def keep_dead_lettering() -> None:
        batch = 0
        while not stop.is_set():
            await produce_records(kafka_bootstrap, dlq, [dead(f"l{batch}".encode(), b"{}", "not_json")], 2)
            batch += 1

    writer = asyncio.create_task(keep_dead_lettering())
    try:
        status = await asyncio.wait_for(run_replay(kafka_bootstrap, "--from-topic", dlq, "--to-topic", events), 60)
    finally:
        stop.set()
        await writer
    assert status == 0
    replayed = [k for k, _, _ in await read_all(kafka_bootstrap, events)]
    assert {k for k in replayed if k and k.startswith(b"e")} == {k for k, _, _ in early}


@pytest.mark.kafka
async def test_a_dead_letter_without_identifier_gets_the_same_derived_one_on_every_replay(
    kafka_bootstrap: str, topics: Any
) -> None:
    """Dead letters written by versions that did not carry identifiers for records rejected before sending."""
    dlq, events = await topics(1)
    source = [(dlq_format.SOURCE_PARTITION, b"3"), (dlq_format.SOURCE_OFFSET, b"41")]
    legacy = (b"k", b'{"event_name": "late"}', [("trace", b"t"), *dlq_headers("meter_unknown"), *source])
    await produce_records(kafka_bootstrap, dlq, [legacy])
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        cluster_id = (await admin.describe_cluster())["cluster_id"]
    finally:
        await admin.close()
    argv = ("--bootstrap-servers", kafka_bootstrap, "--from-topic", dlq, "--to-topic", events)
    assert await replay.run(parse(*argv), environ={}) == 0
    assert await replay.run(parse(*argv), environ={}) == 0
    assert await replay.run(parse(*argv), environ={"INGESTOR_IDENTIFIER_NAMESPACE": "pinned"}) == 0
    assert await replay.run(parse(*argv), environ={"INGESTOR_IDENTIFIER_NAMESPACE": "no.dots"}) == 1
    derived = f"kafka-{cluster_id}.events-3-41".encode()
    assert [headers for _, _, headers in await read_all(kafka_bootstrap, events)] == [
        [("trace", b"t"), (dlq_format.IDENTIFIER, derived)],
        [("trace", b"t"), (dlq_format.IDENTIFIER, derived)],
        [("trace", b"t"), (dlq_format.IDENTIFIER, b"kafka-pinned.events-3-41")],
    ]
