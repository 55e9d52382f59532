"""Stripe list objects and `limit` / `starting_after` / `ending_before` pagination (pure)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ingestor_dev.emulator.errors import invalid
from ingestor_dev.emulator.limits import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

T = TypeVar("T")


def parse_limit(params: Mapping[str, str]) -> int:
    raw = params.get("limit")
    if raw is None:
        return DEFAULT_LIST_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise invalid(f"limit must be an integer between 1 and {MAX_LIST_LIMIT}.", param="limit")
    return int(raw)


def paginate(items: list[T], key: Callable[[T], str], params: Mapping[str, str]) -> tuple[list[T], bool]:
    """One page of `items` (already in list order) and whether more follow."""
    limit = parse_limit(params)
    after, before = params.get("starting_after"), params.get("ending_before")
    ids = [key(item) for item in items]
    if after is not None:
        if after not in ids:
            raise invalid(f"No such object: '{after}'", code="resource_missing", param="starting_after")
        rest = items[ids.index(after) + 1 :]
        return rest[:limit], len(rest) > limit
    if before is not None:
        if before not in ids:
            raise invalid(f"No such object: '{before}'", code="resource_missing", param="ending_before")
        head = items[: ids.index(before)]
        return head[-limit:], len(head) > limit
    return items[:limit], len(items) > limit


def list_object(data: list[dict[str, Any]], has_more: bool, url: str) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}
