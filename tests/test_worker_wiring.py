"""The worker before it starts: every metric family already exported, with a not-started worker's values,
and nothing runs until `async with` started its collaborators."""

from __future__ import annotations

import pytest

from ingestor.settings import load
from ingestor.worker import Worker

ENV = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "INGESTOR_TOPICS": "usage", "STRIPE_API_KEY": "sk_test_wiring"}


def test_a_worker_not_started_exports_every_state_family_with_its_resting_values() -> None:
    worker = Worker(load(ENV))
    sample = worker.metrics.registry.get_sample_value
    assert sample("ingestor_partitions_assigned") == 0
    assert sample("ingestor_partitions_paused") == 0
    assert sample("ingestor_buffered_events") == 0
    assert sample("ingestor_ready") == 0
    assert sample("ingestor_session_rotations_total") == 0
    assert sample("ingestor_session_refresh_failures_total") == 0
    assert sample("ingestor_session_expiry_seconds") is None  # no session yet: no sample
    assert sample("ingestor_adjustments_pending") == 0
    assert sample("ingestor_dlq_backlog_records") == 0
    assert sample("ingestor_budget_demand_requests_per_second") == 0
    assert sample("ingestor_budget_exchange_members") == 1
    assert sample("ingestor_budget_exchange_fallback") == 0
    assert sample("ingestor_budget_total_requests_per_second") == worker.budget.total_rps
    assert worker.lags() == {}
    assert worker.total_lag() == 0


async def test_run_refuses_a_worker_that_was_not_started() -> None:
    worker = Worker(load(ENV))
    with pytest.raises(RuntimeError, match="async with"):
        await worker.run()
    with pytest.raises(RuntimeError, match="async with"):
        _ = worker.sessions
