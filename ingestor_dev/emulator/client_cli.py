"""`ingestor emulator create-meter` and `ingestor emulator totals`: a running emulator, through Stripe's API.

The same calls a user makes to Stripe (`POST /v1/billing/meters`, `GET .../event_summaries`), against the
emulator `ingestor emulator` started (by default at http://127.0.0.1:12111, any well-formed test key).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    import argparse

DEFAULT_URL = "http://127.0.0.1:12111"
DEFAULT_KEY = "sk_test_local"
#: `totals` sums this many days before now (summaries are whole minutes).
TOTALS_DAYS = 2


def configure_parsers(actions: Any) -> None:
    """The client actions, as sub-commands of `ingestor emulator`."""
    create = actions.add_parser("create-meter", help="create a meter in the running emulator")
    create.add_argument("event_name", metavar="EVENT_NAME")
    create.add_argument("--formula", choices=("sum", "count", "last"), default="sum", help="default: %(default)s")
    create.add_argument("--customer-key", default="", help="payload key of the customer (default: stripe_customer_id)")
    create.add_argument("--value-key", default="", help="payload key of the value (default: value)")
    totals = actions.add_parser("totals", help="what the emulator billed a customer on a meter (last 2 days)")
    totals.add_argument("event_name", metavar="EVENT_NAME")
    totals.add_argument("--customer", required=True, help="the customer id, e.g. cus_alice")
    url = os.environ.get("INGESTOR_STRIPE_API_BASE", "").strip() or DEFAULT_URL
    key = os.environ.get("STRIPE_API_KEY", "").strip() or DEFAULT_KEY
    for action in (create, totals):
        action.add_argument(
            "--url", default=url, help=f"the emulator (default: $INGESTOR_STRIPE_API_BASE or {DEFAULT_URL})"
        )
        action.add_argument(
            "--api-key", default=key, help=f"a key it accepts (default: $STRIPE_API_KEY or {DEFAULT_KEY})"
        )


def main(args: argparse.Namespace) -> int:
    call = create_meter if args.emulator_action == "create-meter" else print_totals
    try:
        return asyncio.run(call(args))
    except (aiohttp.ClientError, OSError) as exc:
        print(f"ingestor emulator {args.emulator_action}: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


async def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"}
    async with aiohttp.ClientSession() as http, http.request(method, args.url + path, headers=headers, **kwargs) as r:
        return r.status, await r.json(content_type=None)


async def create_meter(args: argparse.Namespace) -> int:
    form = {
        "display_name": args.event_name,
        "event_name": args.event_name,
        "default_aggregation[formula]": args.formula,
    }
    if args.customer_key:
        form["customer_mapping[type]"] = "by_id"
        form["customer_mapping[event_payload_key]"] = args.customer_key
    if args.value_key:
        form["value_settings[event_payload_key]"] = args.value_key
    status, body = await _call(args, "POST", "/v1/billing/meters", data=form)
    if status != 200:
        print(f"ingestor emulator create-meter: {status} {body.get('error', body)}", file=sys.stderr)
        return 1
    print(f"created meter {body['id']} for event_name {args.event_name} ({args.formula})", file=sys.stderr)
    print(body["id"])
    return 0


async def print_totals(args: argparse.Namespace) -> int:
    status, page = await _call(args, "GET", "/v1/billing/meters", params={"limit": "100"})
    meter = (
        next((m for m in page.get("data", []) if m.get("event_name") == args.event_name), None)
        if status == 200
        else None
    )
    if meter is None:
        print(f"ingestor emulator totals: no meter has event_name {args.event_name!r}", file=sys.stderr)
        return 1
    end = (int(time.time()) // 60 + 2) * 60
    params = {"customer": args.customer, "start_time": str(end - TOTALS_DAYS * 86400), "end_time": str(end)}
    status, summaries = await _call(args, "GET", f"/v1/billing/meters/{meter['id']}/event_summaries", params=params)
    if status != 200:
        print(f"ingestor emulator totals: {status} {summaries.get('error', summaries)}", file=sys.stderr)
        return 1
    total = sum(s["aggregated_value"] for s in summaries["data"])
    print(f"{args.event_name} {args.customer} {total:g}")
    return 0
