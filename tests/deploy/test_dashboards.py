"""The Grafana dashboard and the Prometheus alerts use only metrics the worker exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ingestor-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

METRIC_NAME = re.compile(r"\bingestor_[a-z0-9_]+")
#: Series names that belong to a family of another name: histogram series, the sample of an Info metric.
SERIES_SUFFIXES = ("_bucket", "_sum", "_count", "_info")
#: Keys of the dashboard JSON that hold PromQL (panel targets, template variable queries).
QUERY_KEYS = frozenset({"expr", "query", "definition"})
ALERT_ANNOTATIONS = frozenset({"summary", "description", "runbook"})
SEVERITIES = frozenset({"critical", "warning", "info"})


def _strings_under(node: Any, keys: frozenset[str]) -> list[str]:
    """Every string value found under one of `keys`, anywhere in a decoded JSON document."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_strings_under(value, keys))
    elif isinstance(node, list):
        for item in node:
            found.extend(_strings_under(item, keys))
    return found


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def referenced_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is used (loosely parsed: every `ingestor_*` token of every expression)."""
    sources = {f"alert {rule['alert']}": rule["expr"] for rule in _alert_rules()}
    sources |= {f"dashboard query #{i}": q for i, q in enumerate(_strings_under(_dashboard(), QUERY_KEYS))}
    used: dict[str, set[str]] = {}
    for where, expression in sources.items():
        for name in METRIC_NAME.findall(expression):
            used.setdefault(name, set()).add(where)
    return used


def family_of(series: str, exported: set[str]) -> str | None:
    if series in exported:
        return series
    for suffix in SERIES_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in exported:
            return series.removesuffix(suffix)
    return None


def test_every_metric_used_is_exported() -> None:
    # Provided by the observability module once every part is wired; an ImportError here means it is not yet.
    from ingestor.metric_names import exported_metric_names  # noqa: PLC0415

    exported = exported_metric_names()
    unknown = {name: sorted(where) for name, where in referenced_metrics().items() if not family_of(name, exported)}
    assert not unknown, f"metrics used by the dashboard or alerts but not exported by the worker: {unknown}"


def test_the_loose_parser_finds_metrics() -> None:
    used = referenced_metrics()
    assert "ingestor_events_delivered_total" in used
    assert "ingestor_request_duration_seconds_bucket" in used
    assert family_of("ingestor_request_duration_seconds_bucket", {"ingestor_request_duration_seconds"})
    assert family_of("ingestor_build_info", {"ingestor_build"})
    assert not family_of("ingestor_events_total", {"ingestor_events_consumed_total"})


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in _alert_rules():
        assert rule.get("for"), f"{rule['alert']}: no `for:`"
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"].keys() >= ALERT_ANNOTATIONS, rule["alert"]


def test_dashboard_queries_go_through_the_datasource_variable() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "pod"} <= variables.keys()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
