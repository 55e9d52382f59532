"""Form-encoded bodies as the Stripe SDKs send them: `a[b][c]=v` nests, `a[]=v` or `a[0]=v` lists."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from ingestor_dev.emulator.errors import invalid

_PART = re.compile(r"\[([^\[\]]*)\]")


def parse_form(text: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        _assign(result, key, value)
    return result


def _assign(target: dict[str, Any], key: str, value: str) -> None:
    head, bracket, rest = key.partition("[")
    parts = [head, *_PART.findall(bracket + rest)] if bracket else [head]
    node: dict[str, Any] = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise invalid(f"Invalid parameter: {key}", param=head)
        node = child
    last = parts[-1]
    if last == "" or last.isdigit():
        node.setdefault("__list__", []).append(value)
    else:
        node[last] = value


def as_list(value: Any) -> list[Any] | None:
    if isinstance(value, dict) and "__list__" in value:
        items: list[Any] = value["__list__"]
        return items
    return None
