"""The identifiers seen within the de-duplication window, in a structure that never stalls the loop.

A plain `set` of millions of identifiers stalled the emulator's event loop twice over (measured with
6 million 20-character identifiers on the development machine):

- growing: a set rehashes every entry when it grows (doubling past 50,000 entries), one step of 0.25-1.2 s
  at 1.3, 2.5 and 5 million entries;
- collecting: a set is always tracked by the cyclic collector, and a full collection walks every
  entry, about 0.3 s at 6 million.

During such a pause requests queue in the kernel and are then stamped as arriving together, a burst
that was never on the wire (see `arrival`). Here the identifiers are spread by hash over
`SHARDS` dicts with ``None`` values: a dict holding only strings is not tracked by the collector
(CPython untracks it and keeps it so), and each shard grows alone, a 256th of the work per step.
The price is a Python loop per identifier, about 0.15 µs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

SHARDS: Final = 256
_MASK: Final = SHARDS - 1


class IdentifierSet:
    """A set of strings with the operations the de-duplication needs."""

    __slots__ = ("_shards",)

    def __init__(self) -> None:
        self._shards: list[dict[str, None]] = [{} for _ in range(SHARDS)]

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __contains__(self, identifier: object) -> bool:
        return identifier in self._shards[hash(identifier) & _MASK]

    def add(self, identifier: str) -> None:
        self._shards[hash(identifier) & _MASK][identifier] = None

    def add_new(self, identifiers: Sequence[str]) -> bool:
        """Add every identifier if none is here yet and they are distinct; else add nothing. True if added."""
        shards = self._shards
        homes = [shards[hash(identifier) & _MASK] for identifier in identifiers]
        for identifier, home in zip(identifiers, homes, strict=True):
            if identifier in home:
                return False
        added = 0
        for identifier, home in zip(identifiers, homes, strict=True):
            before = len(home)
            home[identifier] = None
            added += len(home) - before
        if added != len(identifiers):  # a repeat within the request: take those added back out
            for identifier, home in zip(identifiers, homes, strict=True):
                home.pop(identifier, None)
            return False
        return True

    def update(self, identifiers: Iterable[str]) -> None:
        shards = self._shards
        for identifier in identifiers:
            shards[hash(identifier) & _MASK][identifier] = None

    def difference_update(self, identifiers: Iterable[str]) -> None:
        shards = self._shards
        for identifier in identifiers:
            shards[hash(identifier) & _MASK].pop(identifier, None)
