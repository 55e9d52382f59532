"""Where a partition with no committed offset starts (INGESTOR_AUTO_OFFSET_RESET).

- `earliest` bills the partition's history; `latest` skips it. Both are explicit choices.
- `safe` (the default) starts from the earliest offset only when that cannot bill an event twice. Stripe
  counts an identifier once within 24 hours, and a record's identifier is stable (the producer's, or
  derived from its coordinates), so a record newer than SAFE_HISTORY_S is counted once even if another
  deployment (another consumer group) billed it already. A partition with no committed offset that holds
  older records is the operator's decision: the worker refuses to start (exit code 2) and names it.

The check runs at start, for every partition of INGESTOR_TOPICS, before the consumer joins its group.
Record timestamps are the producers' (or the broker's with LogAppendTime); a record written with an old
timestamp counts as old, which errs on the side of asking. Offsets the cluster no longer holds
(retention) are not history: a committed offset below the log start still resumes at the earliest one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiokafka.structs import TopicPartition

from ingestor.settings import SettingsError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

ENV: Final = "INGESTOR_AUTO_OFFSET_RESET"
#: Stripe de-duplicates identifiers for 24 hours; an hour is left to deliver what is re-read.
SAFE_HISTORY_S: Final = 23 * 3600
#: Partitions named in the refusal message.
SHOWN: Final = 10


class OffsetResetRefusedError(SettingsError):
    """`safe` found history that starting from the earliest offset would bill again; the operator decides."""


def client_policy(policy: str) -> str:
    """aiokafka's auto_offset_reset for a policy (`safe` has checked the history before it applies)."""
    return "latest" if policy == "latest" else "earliest"


@dataclass(frozen=True, slots=True)
class History:
    """One partition, as the check sees it."""

    topic: str
    partition: int
    #: the group's committed offset; None: none (the reset policy applies)
    committed: int | None
    beginning: int
    end: int
    #: the first offset whose record is newer than the cutoff; None: no such record
    first_recent: int | None

    @property
    def older(self) -> int:
        """Records older than the cutoff that the reset policy would start from (0 with a committed offset)."""
        if self.committed is not None:
            return 0
        upto = self.end if self.first_recent is None else self.first_recent
        return max(0, upto - self.beginning)


def refused(histories: Iterable[History]) -> list[History]:
    """The partitions `safe` does not start from their earliest offset."""
    return [h for h in histories if h.older > 0]


def refusal_message(group: str, refused: list[History]) -> str:
    shown = ", ".join(f"{h.topic}/{h.partition} ({h.older} records)" for h in refused[:SHOWN])
    more = f" and {len(refused) - SHOWN} more partitions" if len(refused) > SHOWN else ""
    hours = SAFE_HISTORY_S // 3600
    return (
        f"{ENV}=safe: consumer group {group!r} has no committed offset on {shown}{more}, which hold records "
        f"older than {hours} hours. Starting from the earliest offset would bill them, and if another "
        "deployment already billed them Stripe would count them again (it de-duplicates identifiers for 24 "
        f"hours only). Choose: {ENV}=earliest to bill that history, or {ENV}=latest to skip it."
    )


async def survey(consumer: Any, partitions: Mapping[str, tuple[int, ...]], now: float) -> list[History]:
    """Committed offset, bounds and the first recent offset of every partition (consumer: aiokafka's)."""
    tps = [TopicPartition(topic, p) for topic, numbers in partitions.items() for p in numbers]
    if not tps:
        return []
    committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
    beginning = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    cutoff_ms = int((now - SAFE_HISTORY_S) * 1000)
    recent = await consumer.offsets_for_times(dict.fromkeys(tps, cutoff_ms))
    return [
        History(
            tp.topic,
            tp.partition,
            offset,
            beginning[tp],
            end[tp],
            None if recent.get(tp) is None else recent[tp].offset,
        )
        for tp, offset in zip(tps, committed, strict=True)
    ]


async def check_safe(consumer: Any, group: str, partitions: Mapping[str, tuple[int, ...]], now: float) -> None:
    """Raise OffsetResetRefusedError when a partition without a committed offset holds old records."""
    bad = refused(await survey(consumer, partitions, now))
    if bad:
        raise OffsetResetRefusedError(refusal_message(group, bad))
