"""The metric names a fully wired worker exports: what the README and the dashboards are checked against.

Apart from `observability` (which the worker imports) so that reading the names, which builds a worker,
makes no import cycle.
"""

from __future__ import annotations

from ingestor.settings import load
from ingestor.worker import Worker


def exported_metric_names() -> set[str]:
    """Every metric name a fully wired worker exports (counters with `_total`, info with `_info`)."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "INGESTOR_TOPICS": "t", "STRIPE_API_KEY": "sk_test_names"}
    worker = Worker(load(env))
    suffix = {"counter": "_total", "info": "_info"}
    return {family.name + suffix.get(family.type, "") for family in worker.metrics.registry.collect()}
