from __future__ import annotations

import asyncio
import shlex
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from ingestor import cli, kafka_preflight, settings
from ingestor_dev import devkafka
from ingestor_dev.devkafka import (
    COMPLETE_MARKER,
    KAFKA_VERSION,
    BrokerState,
    KafkaStartError,
    LocalKafka,
    committed_offsets,
    fetch,
    probe,
    produce,
)

if TYPE_CHECKING:
    from conftest import TopicFactory

pytestmark = pytest.mark.kafka


async def consume_all(bootstrap: str, topic: str, count: int) -> list[tuple[int, bytes | None, bytes]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    records: list[tuple[int, bytes | None, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records += [(r.partition, r.key, r.value) for r in batch]
    finally:
        await consumer.stop()
    return records


async def test_produce_and_consume_round_trip(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = await topic_factory(3)
    keys = [f"cus_{i % 7}".encode() for i in range(500)]
    values = [f"{i}".encode() for i in range(500)]

    assert await produce(kafka_bootstrap, topic, values, keys=keys) == 500
    records = await consume_all(kafka_bootstrap, topic, 500)

    assert sorted(int(v) for _, _, v in records) == list(range(500))
    partitions_of_key: dict[bytes | None, set[int]] = defaultdict(set)
    per_key: dict[bytes | None, list[int]] = defaultdict(list)
    for partition, key, value in records:
        partitions_of_key[key].add(partition)
        per_key[key].append(int(value))
    assert all(len(found) == 1 for found in partitions_of_key.values())  # a key stays on one partition
    assert all(seen == sorted(seen) for seen in per_key.values())  # in the order produced


async def test_produce_spreads_unkeyed_records_and_honours_a_fixed_partition(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(4)
    await produce(kafka_bootstrap, topic, [b"x"] * 40)
    await produce(kafka_bootstrap, topic, [b"y"] * 10, partition=2, headers=[("h", b"1")])

    records = await consume_all(kafka_bootstrap, topic, 50)

    assert sorted({p for p, _, v in records if v == b"x"}) == [0, 1, 2, 3]
    assert {p for p, _, v in records if v == b"y"} == {2}


async def test_create_topic_makes_all_partitions_visible(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = await topic_factory(6, prefix="six", config={"retention.ms": "3600000"})

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert topic.startswith("six-")
    assert described["error_code"] == 0
    assert sorted(p["partition"] for p in described["partitions"]) == list(range(6))
    assert all(p["leader"] >= 0 for p in described["partitions"])


async def test_committed_offsets_after_a_manual_commit(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = await topic_factory(2)
    group = f"g-{topic}"
    assert await committed_offsets(kafka_bootstrap, group, topic) == {}

    await produce(kafka_bootstrap, topic, [b"a", b"b", b"c"], partition=1)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        await consumer.commit({TopicPartition(topic, 1): 2})
    finally:
        await consumer.stop()

    assert await committed_offsets(kafka_bootstrap, group, topic) == {1: 2}
    assert await committed_offsets(kafka_bootstrap, group, "another-topic") == {}


def test_fetch_is_idempotent_and_skips_maven_once_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    libs = fetch()  # the session's broker (or `make kafka-fetch`) has fetched already
    marker = libs / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns

    def no_maven(version: str, libs: Path) -> None:
        raise AssertionError("Maven ran for a complete cache")

    monkeypatch.setattr(devkafka, "_fetch_with_maven", no_maven)
    started = time.monotonic()
    assert fetch() == libs
    assert time.monotonic() - started < 1
    assert marker.stat().st_mtime_ns == before
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


def test_fetch_retries_a_partial_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(devkafka.CACHE_ENV, str(tmp_path))
    partial = tmp_path / "9.9.9" / "libs"
    partial.mkdir(parents=True)
    (partial / "half-a-jar.jar").write_bytes(b"")  # no completion marker: a failed earlier fetch
    calls: list[str] = []

    def fake_maven(version: str, libs: Path) -> None:
        calls.append(version)
        libs.mkdir(parents=True, exist_ok=True)
        (libs / COMPLETE_MARKER).write_text(version)

    monkeypatch.setattr(devkafka, "_fetch_with_maven", fake_maven)

    assert fetch("9.9.9") == partial
    assert fetch("9.9.9") == partial
    assert calls == ["9.9.9"]


def test_a_busy_port_fails_start_with_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        broker = LocalKafka(port=busy.getsockname()[1])
        with pytest.raises(KafkaStartError, match="already in use"):
            broker.start()
    broker.stop()


@pytest.mark.slow
def test_local_kafka_starts_stops_and_frees_its_port() -> None:
    broker = LocalKafka()
    with broker:
        assert asyncio.run(probe(broker.bootstrap))
        data_dir = broker.data_dir
        assert "PLAINTEXT" in (data_dir / "broker.log").read_text()
    broker.stop()  # a second stop is a no-op

    assert not data_dir.exists()
    with socket.socket() as again:
        again.bind(("127.0.0.1", broker.port))
    with pytest.raises(RuntimeError, match="starts once"):
        broker.start()


@pytest.fixture
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A cache of its own (broker state, data) in `tmp_path`, with the fetched Kafka's libraries linked in."""
    libs = fetch()
    monkeypatch.setenv(devkafka.CACHE_ENV, str(tmp_path))
    (tmp_path / KAFKA_VERSION).mkdir()
    (tmp_path / KAFKA_VERSION / "libs").symlink_to(libs)
    return tmp_path


@pytest.mark.slow
@pytest.mark.usefixtures("private_cache")
def test_cli_up_status_down(capsys: pytest.CaptureFixture[str]) -> None:
    port = devkafka.free_port()

    assert cli.main(["kafka", "down"]) == 0  # nothing to stop
    assert cli.main(["kafka", "status"]) == 1
    try:
        assert cli.main(["kafka", "up", "--port", str(port)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"127.0.0.1:{port}"
        assert cli.main(["kafka", "up", "--port", str(port)]) == 0
        assert "already running" in capsys.readouterr().err
        assert cli.main(["kafka", "status"]) == 0
        state = BrokerState.load()
        assert state is not None
        assert state.is_running()
    finally:
        assert cli.main(["kafka", "down"]) == 0

    assert not state.is_running()
    assert BrokerState.load() is None
    assert cli.main(["kafka", "status"]) == 1


@pytest.mark.slow
def test_a_broker_does_not_outlive_its_killed_owner(tmp_path: Path) -> None:
    owner_code = (
        "import sys, time\n"
        "from ingestor_dev.devkafka import LocalKafka\n"
        "broker = LocalKafka()\n"
        "broker.start()\n"
        "print(broker.pid, broker.data_dir, flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert owner.stdout is not None
        pid, data_dir = owner.stdout.readline().decode().split()
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()

    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    while Path(data_dir).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(data_dir).exists()


@pytest.mark.slow
@pytest.mark.usefixtures("private_cache")
def test_cli_up_secure_and_env_print_working_settings_for_every_mode(capsys: pytest.CaptureFixture[str]) -> None:
    port = devkafka.free_port()

    assert cli.main(["kafka", "env", "mtls"]) == 1  # nothing runs
    try:
        assert cli.main(["kafka", "up", "--port", str(port), "--secure"]) == 0
        assert "secure listeners:" in capsys.readouterr().err
        for mode in ["plaintext", *devkafka.SECURE_MODES]:
            assert cli.main(["kafka", "env", mode]) == 0
            printed = capsys.readouterr().out
            env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in printed.splitlines())
            assert "KAFKA_SASL_PASSWORD" not in env  # a file, never the password itself
            # The printed settings connect: TLS verified, SASL accepted, client certificate accepted.
            asyncio.run(kafka_preflight.check(settings.load_kafka(env)))
            assert asyncio.run(_metadata_round_trip(settings.load_kafka(env)))
    finally:
        assert cli.main(["kafka", "down"]) == 0


async def _metadata_round_trip(connection: settings.KafkaConnection) -> bool:
    admin = AIOKafkaAdminClient(**connection.client_options())
    await admin.start()
    try:
        return isinstance(await admin.list_topics(), list)
    finally:
        await admin.close()


def test_secure_broker_settings_give_each_listener_its_mode(tmp_path: Path) -> None:
    listeners = devkafka.SecureListeners(
        {name: 10_000 + i for i, name in enumerate(devkafka.LISTENER_PROTOCOLS)},
        devkafka.TlsMaterial(tmp_path),
        password="pw-secret",
    )
    text = devkafka._server_properties(9092, 9093, tmp_path / "kraft", listeners)
    props = dict(line.split("=", 1) for line in text.splitlines())

    assert props["listener.security.protocol.map"].split(",") == [
        "PLAINTEXT:PLAINTEXT",
        "CONTROLLER:PLAINTEXT",
        "SSL:SSL",
        "SASL_SSL:SASL_SSL",
        "SASL_PLAINTEXT:SASL_PLAINTEXT",
        "MTLS:SSL",
        "WRONG_HOST:SSL",
    ]
    assert props["listener.name.mtls.ssl.client.auth"] == "required"
    assert props["ssl.client.auth"] == "none"
    assert props["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-256,SCRAM-SHA-512,PLAIN"
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert "SASL_SSL://127.0.0.1:10001" in props["advertised.listeners"]
    assert listeners.storage_arguments() == [
        "--add-scram",
        "SCRAM-SHA-256=[name=ingestor,password=pw-secret,iterations=4096]",
        "--add-scram",
        "SCRAM-SHA-512=[name=ingestor,password=pw-secret,iterations=4096]",
    ]
    assert "pw-secret" not in repr(listeners)
    mtls = listeners.client_env("mtls")
    assert mtls["KAFKA_SECURITY_PROTOCOL"] == "SSL"
    assert mtls["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:10003"
    assert {"KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE", "KAFKA_SSL_CAFILE"} <= mtls.keys()
    plain = listeners.client_env("sasl-plaintext-plain")
    assert plain["KAFKA_SASL_MECHANISM"] == "PLAIN"
    assert "KAFKA_SSL_CAFILE" not in plain


def test_plaintext_broker_settings_are_unchanged_without_secure_listeners(tmp_path: Path) -> None:
    props = dict(line.split("=", 1) for line in devkafka._server_properties(9092, 9093, tmp_path).splitlines())

    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert not any(key.startswith(("ssl.", "listener.name.")) for key in props)


def test_a_port_whose_connections_linger_in_time_wait_is_free_for_the_broker() -> None:
    """After `kafka down`, the broker's closed connections sit in TIME_WAIT for a minute; the broker itself
    binds with SO_REUSEADDR and starts, so the probe must not call the port "in use" either."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker (Java) listens
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: its end of the connection enters TIME_WAIT
            client.recv(1)
    devkafka._ensure_port_free(port)


@pytest.mark.slow
def test_cli_down_says_what_it_deletes_and_keeps_data_when_asked(
    private_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = devkafka.free_port()
    lines = private_cache / "events.jsonl"
    lines.write_text('{"event_name": "a", "payload": {}}\n\n{"event_name": "b", "payload": {}}\n')
    try:
        assert cli.main(["kafka", "up", "--port", str(port)]) == 0
        assert cli.main(["kafka", "create-topic", "kept", "--partitions", "2"]) == 0
        assert cli.main(["kafka", "create-topic", "kept"]) == 0  # an existing topic is not an error
        assert cli.main(["kafka", "produce", "kept", str(lines)]) == 0
        assert "produced 2 records to kept" in capsys.readouterr().err
        state = BrokerState.load()
        assert state is not None
        assert cli.main(["kafka", "down", "--keep-data"]) == 0
        assert f"kept its data in {state.data_dir}" in capsys.readouterr().err
        # at once, on the same port: the connections the broker just closed do not make it "in use"
        assert cli.main(["kafka", "up", "--port", str(port)]) == 0
        assert "reusing the data" in capsys.readouterr().err
        records = asyncio.run(consume_all(f"127.0.0.1:{port}", "kept", 2))
        assert sorted(value for _, _, value in records) == [
            b'{"event_name": "a", "payload": {}}',
            b'{"event_name": "b", "payload": {}}',
        ]
    finally:
        assert cli.main(["kafka", "down"]) == 0
    err = capsys.readouterr().err
    assert f"deleted its data in {state.data_dir}" in err
    assert "--keep-data" in err
    assert not Path(state.data_dir).exists()
