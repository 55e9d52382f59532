"""Identifiers: the namespace of derived ones, the identifier a rejected record carries, the namespace
setting, and the pure core of INGESTOR_AUTO_OFFSET_RESET=safe."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ingestor import cluster, dlq_format, offset_reset, replay
from ingestor.catalog import Meter, MeterCatalog
from ingestor.events import MAX_IDENTIFIER_CHARS, Decoder, identifier_prefix
from ingestor.settings import SettingsError, load
from tests.corpus import DEFAULT_MAX_RECORD_BYTES, FakeRecord, event_bytes

NOW = 1_780_000_000.0
NOW_MS = int(NOW * 1000)
NS = "MkU3OEVBNTcwNTJENDM2Qg"  # the shape of a Kafka cluster id
BASE = {"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "INGESTOR_TOPICS": "usage", "STRIPE_API_KEY": "sk_test_abc123"}


def rec(value: bytes | None, *, offset: int = 7, headers: tuple[tuple[str, bytes], ...] = ()) -> FakeRecord:
    return FakeRecord("usage", 2, offset, NOW_MS, None, value, headers)


def decoder(catalog: MeterCatalog | None = None, namespace: str = NS) -> Decoder:
    return Decoder(catalog or MeterCatalog(), max_record_bytes=DEFAULT_MAX_RECORD_BYTES, namespace=namespace)


# --- derived identifiers ----------------------------------------------------------------------------


def test_derived_identifiers_carry_the_namespace() -> None:
    events, _, rejected = decoder().decode([rec(event_bytes(), offset=42)], NOW)
    assert not rejected
    assert events[0]["identifier"] == f"kafka-{NS}.usage-2-42"
    # The same coordinates in another namespace are another identifier.
    other, _, _ = decoder(namespace="other-cluster").decode([rec(event_bytes(), offset=42)], NOW)
    assert other[0]["identifier"] == "kafka-other-cluster.usage-2-42"


def test_the_namespace_ends_at_the_first_dot_so_namespaces_and_topics_never_run_together() -> None:
    assert identifier_prefix("c", 0, "a-b") != identifier_prefix("b-c", 0, "a")
    assert identifier_prefix("b.c", 0, "a") == "kafka-a.b.c-0-"  # namespaces have no ".": it ends at the first
    assert identifier_prefix("events", 0, "") == "kafka-events-0-"  # no namespace: the earlier form


@pytest.mark.parametrize("namespace", ["", "x", NS, "n" * 32])
@pytest.mark.parametrize(("topic", "partition"), [("t", 0), ("t" * 60, 7), ("t" * 249, 0), ("t" * 249, 2**31 - 1)])
def test_identifiers_stay_within_100_characters(namespace: str, topic: str, partition: int) -> None:
    prefix = identifier_prefix(topic, partition, namespace)
    assert len(prefix + str(2**63 - 1)) <= MAX_IDENTIFIER_CHARS
    assert prefix.startswith(f"kafka-{namespace}." if namespace else "kafka-")
    assert prefix == identifier_prefix(topic, partition, namespace)
    assert prefix != identifier_prefix(topic + "x", partition, namespace)


# --- the identifier a rejected record carries into the dead-letter topic ----------------------------


def unknown_meter(**fields: Any) -> bytes:
    return event_bytes(event_name="late_meter", **fields)


KNOWN = MeterCatalog([Meter("api_requests")], known=True)
CARRIED = ((dlq_format.IDENTIFIER, b"carried-9"),)


@pytest.mark.parametrize(
    ("value", "headers", "expected"),
    [
        (unknown_meter(identifier="own-1"), (), "own-1"),  # the producer's
        (unknown_meter(identifier="own-1"), CARRIED, "own-1"),  # the producer's wins over a carried one
        (unknown_meter(), CARRIED, "carried-9"),  # replayed before
        (unknown_meter(identifier=None), CARRIED, "carried-9"),
        (unknown_meter(), (), f"kafka-{NS}.usage-2-7"),  # derived
        (unknown_meter(), ((dlq_format.IDENTIFIER, b"\xff\xfe"),), f"kafka-{NS}.usage-2-7"),  # as decode does
        (unknown_meter(), ((dlq_format.IDENTIFIER, b""),), f"kafka-{NS}.usage-2-7"),
        (b"not json", (), f"kafka-{NS}.usage-2-7"),
        (b"[1, 2]", CARRIED, "carried-9"),
        (None, (), f"kafka-{NS}.usage-2-7"),  # a tombstone
        (unknown_meter(identifier=5), (), ""),  # identifier_invalid: none can be determined
        (unknown_meter(identifier="i" * 101), (), ""),
        (unknown_meter(), ((dlq_format.IDENTIFIER, b"h" * 101),), ""),
    ],
)
def test_a_rejected_record_gets_the_identifier_its_event_is_billed_with(
    value: bytes | None, headers: tuple[tuple[str, bytes], ...], expected: str
) -> None:
    dec = decoder(KNOWN)
    record = rec(value, headers=headers)
    _, _, rejected = dec.decode([record], NOW)
    assert rejected, "the record must be rejected"
    assert dec.identifier_of(record) == expected


def test_a_record_too_large_carries_the_producers_identifier() -> None:
    big = unknown_meter(identifier="big-1", payload={"stripe_customer_id": "cus_1", "value": "1", "pad": "x" * 500})
    dec = Decoder(KNOWN, max_record_bytes=100, namespace=NS)
    _, _, rejected = dec.decode([rec(big)], NOW)
    assert rejected[0][1].reason == "record_too_large"
    assert dec.identifier_of(rec(big)) == "big-1"


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        (event_bytes(), ()),
        (event_bytes(identifier="given"), ()),
        (event_bytes(), CARRIED),
        (event_bytes(identifier="given", timestamp=NOW), CARRIED),
        (event_bytes(), ((dlq_format.IDENTIFIER, b"\xff"),)),
    ],
)
def test_identifier_of_agrees_with_what_decode_bills(value: bytes, headers: tuple[tuple[str, bytes], ...]) -> None:
    dec = decoder()
    record = rec(value, headers=headers)
    events, _, rejected = dec.decode([record], NOW)
    assert not rejected
    assert dec.identifier_of(record) == events[0]["identifier"]


# --- the namespace: setting and cluster id --------------------------------------------------------


def test_the_namespace_is_the_setting_else_the_cluster_id() -> None:
    assert cluster.identifier_namespace("pinned", NS) == "pinned"
    assert cluster.identifier_namespace("", NS) == NS
    hashed = cluster.identifier_namespace("", "redpanda.0b7e1b0c-6c1f-4a2e-9f4b-2d8c8a1e2f3a")
    assert len(hashed) == cluster.HASHED_CHARS
    assert hashed.isalnum()
    assert hashed == cluster.identifier_namespace("", "redpanda.0b7e1b0c-6c1f-4a2e-9f4b-2d8c8a1e2f3a")
    for missing in ("", None):
        with pytest.raises(SettingsError, match="INGESTOR_IDENTIFIER_NAMESPACE"):
            cluster.identifier_namespace("", missing)


def test_namespace_setting_is_validated_and_defaults_to_the_cluster_id() -> None:
    assert load(BASE).identifier_namespace == ""
    assert load({**BASE, "INGESTOR_IDENTIFIER_NAMESPACE": " old-cluster_1 "}).identifier_namespace == "old-cluster_1"
    for bad in ("a.b", "n" * 33, "caf\u00e9", "a/b", "a b"):
        with pytest.raises(SettingsError, match="INGESTOR_IDENTIFIER_NAMESPACE"):
            load({**BASE, "INGESTOR_IDENTIFIER_NAMESPACE": bad})


def test_offset_reset_defaults_to_safe_and_takes_only_the_three_policies() -> None:
    assert load(BASE).auto_offset_reset == "safe"
    for policy in ("safe", "earliest", "latest"):
        assert load({**BASE, "INGESTOR_AUTO_OFFSET_RESET": policy}).auto_offset_reset == policy
    with pytest.raises(SettingsError, match="INGESTOR_AUTO_OFFSET_RESET"):
        load({**BASE, "INGESTOR_AUTO_OFFSET_RESET": "none"})
    assert [offset_reset.client_policy(p) for p in ("safe", "earliest", "latest")] == ["earliest", "earliest", "latest"]


# --- the pure core of `safe` ------------------------------------------------------------------------


def history(committed: int | None, beginning: int, end: int, first_recent: int | None, p: int = 0) -> Any:
    return offset_reset.History("usage", p, committed, beginning, end, first_recent)


def test_records_older_than_the_cutoff_count_only_without_a_committed_offset() -> None:
    assert history(None, 0, 0, None).older == 0  # empty
    assert history(None, 0, 50, 0).older == 0  # every record recent
    assert history(None, 10, 50, 30).older == 20  # 10..29 old (retention removed 0..9)
    assert history(None, 0, 50, None).older == 50  # every record old
    assert history(12, 0, 50, None).older == 0  # the group resumes at its committed offset
    assert offset_reset.refused([history(None, 0, 5, 0), history(None, 0, 5, 3, p=1), history(4, 0, 5, None)]) == [
        history(None, 0, 5, 3, p=1)
    ]


def test_the_refusal_names_the_setting_the_partitions_and_the_counts() -> None:
    many = [history(None, 0, 100 + p, None, p=p) for p in range(12)]
    message = offset_reset.refusal_message("billing", many)
    assert message.startswith("INGESTOR_AUTO_OFFSET_RESET=safe: consumer group 'billing'")
    assert "usage/0 (100 records)" in message
    assert "usage/9 (109 records)" in message
    assert "usage/10" not in message
    assert "and 2 more partitions" in message
    assert "older than 23 hours" in message
    assert "INGESTOR_AUTO_OFFSET_RESET=earliest to bill that history" in message
    assert "INGESTOR_AUTO_OFFSET_RESET=latest to skip it" in message


# --- replay of dead letters written before identifiers were carried ---------------------------------


def dlq_record(*headers: tuple[str, bytes]) -> replay.DlqRecord:
    return replay.DlqRecord("dlq", 0, 0, None, orjson.dumps({"event_name": "x"}), headers)


SOURCE = (
    (dlq_format.SOURCE_TOPIC, b"usage"),
    (dlq_format.SOURCE_PARTITION, b"2"),
    (dlq_format.SOURCE_OFFSET, b"7"),
)


def test_a_legacy_dead_letter_is_given_the_identifier_derived_from_its_source() -> None:
    legacy = dlq_record(("trace", b"t"), *SOURCE, (dlq_format.REASON, b"meter_unknown"))
    derived = legacy.derived_identifier(NS)
    assert derived == f"kafka-{NS}.usage-2-7"
    assert replay.replay_headers(legacy.headers, derived) == [
        ("trace", b"t"),
        (dlq_format.IDENTIFIER, derived.encode()),
    ]
    # A carried identifier always wins.
    current = dlq_record(*SOURCE, (dlq_format.IDENTIFIER, b"kept"))
    assert replay.replay_headers(current.headers, current.derived_identifier(NS)) == [(dlq_format.IDENTIFIER, b"kept")]
    # Without complete source coordinates, nothing is derived.
    assert dlq_record(*SOURCE[:2]).derived_identifier(NS) is None
    assert dlq_record(*SOURCE[:2], (dlq_format.SOURCE_OFFSET, b"-1")).derived_identifier(NS) is None
