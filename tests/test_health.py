"""Health judgements (pure: a fake clock and a lag function) and the JSON log format."""

from __future__ import annotations

import logging

import orjson

from ingestor.observability import HealthState, JsonFormatter


class Monotonic:
    """A monotonic time function that tests move by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def healthy(lag: list[int]) -> tuple[HealthState, Monotonic]:
    clock = Monotonic()
    state = HealthState(stuck_after=10, monotonic=clock, lag=lambda: lag[0])
    state.last_progress = clock.now
    state.joined = state.stripe_ok = True
    return state, clock


def test_not_ready_until_joined_with_kafka_and_stripe():
    state, _ = healthy([0])
    assert state.readiness() == (True, "ok")
    for attr, reason in (("joined", "consumer group"), ("kafka_ok", "Kafka"), ("stripe_ok", "Stripe")):
        setattr(state, attr, False)
        ok, why = state.readiness()
        assert not ok
        assert reason in why
        setattr(state, attr, True)
    state.running = False
    assert state.readiness() == (False, "stopping")


def test_lag_without_progress_fails_readiness_then_liveness_and_progress_recovers():
    lag = [5]
    state, clock = healthy(lag)
    state.stuck_for()  # the worker observes lag every commit tick
    clock.now += 9
    assert state.readiness()[0]
    clock.now += 2
    assert not state.readiness()[0]
    assert state.liveness()[0]
    clock.now += 10
    assert not state.liveness()[0]
    state.progressed()
    assert state.readiness()[0]
    assert state.liveness()[0]


def test_an_idle_worker_is_not_stuck_when_traffic_resumes():
    lag = [0]
    state, clock = healthy(lag)
    clock.now += 3600  # idle for an hour: no progress, no lag
    assert state.readiness()[0]
    lag[0] = 1000  # traffic arrives
    assert state.readiness()[0]  # lag noticed now: the stuck clock starts here, not an hour ago
    clock.now += 11
    assert not state.readiness()[0]


def test_json_log_lines_carry_context():
    record = logging.LogRecord("ingestor.worker", logging.INFO, __file__, 1, "assigned %d", (3,), None)
    record.partitions = ["t/0"]
    line = orjson.loads(JsonFormatter().format(record))
    assert line["level"] == "info"
    assert line["logger"] == "ingestor.worker"
    assert line["message"] == "assigned 3"
    assert line["partitions"] == ["t/0"]
    assert line["time"].endswith("Z")
