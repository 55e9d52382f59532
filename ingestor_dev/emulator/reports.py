"""Asynchronous validation error reports and their webhook events (pure).

Choice made here (the worker turns every reported identifier into a dead-letter record): **no
failure is ever left out.** Stripe caps `sample_errors`; the emulator instead cuts the failures of a
validation pass into reports of at most `MAX_ERRORS_PER_REPORT` (100) failures each, and every
failure appears in exactly one report's `sample_errors`, with its `request.identifier`. Each report
is self-contained: its `reason.error_count` and each type's `error_count` count the failures it
carries, so summing over all reports gives the totals. One report is one webhook.

Report data (also readable at `GET /_emulator/error_reports`):
`{"id", "object": "billing.meter_error_report", "type", "livemode", "meter", "event_name",
"developer_message_summary", "validation_start", "validation_end", "reason": {"error_count",
"error_types": [{"code", "error_count", "sample_errors": [{"error_message", "request":
{"identifier"}}]}]}}` where `type` is `v1.billing.meter.error_report_triggered` (the meter exists:
`meter` is its id) or `v1.billing.meter.no_meter_found` (`meter` is null), and the two validation
times are RFC 3339 strings.

Webhook body: a v1 *snapshot* event, `{"id": "evt_...", "object": "event", "api_version", "created",
"livemode", "pending_webhooks", "request": {"id": null, "idempotency_key": null}, "type",
"data": {"object": <report data>}, "related_object": {"id", "type": "billing.meter", "url"} | null}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ingestor_dev.emulator.limits import MAX_ERRORS_PER_REPORT
from ingestor_dev.emulator.timefmt import format_rfc3339

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

ERROR_REPORT = "v1.billing.meter.error_report_triggered"
NO_METER = "v1.billing.meter.no_meter_found"
API_VERSION = "2026-06-24.dahlia"


@dataclass(frozen=True, slots=True)
class Failure:
    identifier: str
    event_name: str
    meter_id: str | None
    livemode: bool
    code: str
    message: str
    arrival: float

    def to_json(self) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "event_name": self.event_name,
            "meter": self.meter_id,
            "livemode": self.livemode,
            "code": self.code,
            "message": self.message,
        }


def group_failures(failures: Iterable[Failure]) -> dict[tuple[bool, str | None, str], list[Failure]]:
    """Failures by (livemode, meter id, event name); a missing meter groups by event name."""
    groups: dict[tuple[bool, str | None, str], list[Failure]] = {}
    for failure in failures:
        name = "" if failure.meter_id else failure.event_name
        groups.setdefault((failure.livemode, failure.meter_id, name), []).append(failure)
    return groups


def build_reports(failures: list[Failure], validation_end: float, new_id: Callable[[str], str]) -> list[dict[str, Any]]:
    reports = []
    for (livemode, meter_id, _), group in group_failures(failures).items():
        for offset in range(0, len(group), MAX_ERRORS_PER_REPORT):
            chunk = group[offset : offset + MAX_ERRORS_PER_REPORT]
            reports.append(_report(chunk, livemode, meter_id, validation_end, new_id("mtrerr_")))
    return reports


def _report(
    chunk: list[Failure], livemode: bool, meter_id: str | None, validation_end: float, report_id: str
) -> dict[str, Any]:
    by_code: dict[str, list[Failure]] = {}
    for failure in chunk:
        by_code.setdefault(failure.code, []).append(failure)
    error_types = [
        {
            "code": code,
            "error_count": len(items),
            "sample_errors": [
                {"error_message": item.message, "request": {"identifier": item.identifier}} for item in items
            ],
        }
        for code, items in by_code.items()
    ]
    return {
        "id": report_id,
        "object": "billing.meter_error_report",
        "type": ERROR_REPORT if meter_id else NO_METER,
        "livemode": livemode,
        "meter": meter_id,
        "event_name": chunk[0].event_name,
        "developer_message_summary": _summary(chunk, by_code),
        "validation_start": format_rfc3339(min(item.arrival for item in chunk)),
        "validation_end": format_rfc3339(validation_end),
        "reason": {"error_count": len(chunk), "error_types": error_types},
    }


def _summary(chunk: list[Failure], by_code: dict[str, list[Failure]]) -> str:
    codes = ", ".join(f"{code} ({len(items)})" for code, items in by_code.items())
    return f"{len(chunk)} meter events for `{chunk[0].event_name}` failed validation: {codes}."


def webhook_event(report: dict[str, Any], event_id: str, created: int) -> dict[str, Any]:
    meter_id = report["meter"]
    related = {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"} if meter_id else None
    return {
        "id": event_id,
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "livemode": report["livemode"],
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": report["type"],
        "data": {"object": report},
        "related_object": related,
    }
