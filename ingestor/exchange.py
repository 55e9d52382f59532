"""The demand exchange: each replica's demand on a small Kafka topic, read by every replica.

The shell around `ingestor.demand` (where the design and its proof are): a producer publishes this
replica's demand every INGESTOR_BUDGET_EXCHANGE_INTERVAL_S, a consumer reads the topic's single
partition from its beginning, and a ticker turns the picture into the budget gate's quota ten times a
second. The topic (INGESTOR_BUDGET_TOPIC) is created when missing: one partition (every replica must
read every record in one order), compacted and deleted after an hour (it holds one small record per
live replica), broker timestamps. Records already there at start are ignored when older than the TTL
(replicas gone before); every later record counts, whatever its timestamp. Records are keyed
``<group id>/<member>``; replicas of other consumer groups on the same topic are ignored (each
deployment has its own INGESTOR_RPS_BUDGET). The value is JSON ``{"seq", "demand", "owned"}``; a
clean stop writes a tombstone.

No request waits on Kafka: the gate keeps pacing at the last quota, and a quota only falls while the
picture goes stale (`ingestor.demand` explains when it falls to zero and when to the fallback share).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from ingestor.demand import Decision, DemandBook, Inputs, Mode, Timing, budget_units
from ingestor.settings import SettingsError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ingestor.budget import BudgetGate
    from ingestor.clock import Clock
    from ingestor.settings import Settings

log = logging.getLogger("ingestor.exchange")

#: Demand is "wants more" for this long after callers were last seen waiting on the budget.
DEMAND_MEMORY_S: Final = 2.0
#: A replica not waiting on the budget asks for this much more than it used lately.
DEMAND_MARGIN: Final = 1.25
TOPIC_CONFIG: Final = {
    "cleanup.policy": "compact,delete",
    "retention.ms": "3600000",
    "segment.ms": "600000",
    "min.compaction.lag.ms": "0",
    "message.timestamp.type": "LogAppendTime",
}
STOP_TIMEOUT_S: Final = 2.0
TOPIC_READY_TIMEOUT_S: Final = 10.0


class DemandMeter:
    """This replica's demand in requests/s, from the gate: everything (``units``) while callers were
    waiting on the budget within the last DEMAND_MEMORY_S, else a margin over the recent send rate."""

    def __init__(self, now: float) -> None:
        self._samples: deque[tuple[float, int, bool]] = deque()
        self._last_blocked = -math.inf
        self.sample(0, blocked=False, now=now)

    def sample(self, reservations_total: int, *, blocked: bool, now: float) -> None:
        self._samples.append((now, reservations_total, blocked))
        if blocked:
            self._last_blocked = now
        while len(self._samples) > 1 and self._samples[1][0] <= now - DEMAND_MEMORY_S:
            self._samples.popleft()

    def demand(self, units: int, now: float) -> int:
        if now - self._last_blocked < DEMAND_MEMORY_S:
            return units
        (t0, n0, _), (t1, n1, _) = self._samples[0], self._samples[-1]
        if n1 <= n0 or t1 <= t0:
            return 0
        return min(units, math.ceil(DEMAND_MARGIN * (n1 - n0) / max(t1 - t0, 1.0)))


class DemandExchange:
    """Publishes this replica's demand, reads everyone's, and sets the gate's quota."""

    def __init__(  # noqa: PLR0913 - the exchange's collaborators, each needed
        self,
        *,
        topic: str,
        group_id: str,
        client_id: str,
        bootstrap_servers: str,
        security: dict[str, Any],
        gate: BudgetGate,
        headroom: float,
        ownership: Callable[[], tuple[int, int]],
        clock: Clock,
        timing: Timing,
    ) -> None:
        self.topic = topic
        self.member = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._key_prefix = f"{group_id}/"
        self._client_id = f"{client_id}-budget"
        self._bootstrap = bootstrap_servers
        self._security = security
        self.gate = gate
        self.units = budget_units(int(gate.budget.total_rps), headroom)
        self._ownership = ownership
        self._clock = clock
        self.timing = timing
        now = clock.monotonic()
        self.book = DemandBook(self.member, timing, now)
        self.meter = DemandMeter(now)
        self.demand = 0
        self.decision = Decision(Mode.EXCHANGE, 0, 1)
        self._tp = TopicPartition(topic, 0)
        self._producer: Any = None
        self._consumer: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sending: asyncio.Task[None] | None = None
        self._stopped = False
        self._left = False
        #: records below this offset were there before we started: those older than the TTL are ignored
        self._catch_up_to = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self, on_failure: Callable[[asyncio.Task[Any]], None]) -> None:
        await self._ensure_topic()
        common = {"bootstrap_servers": self._bootstrap, "client_id": self._client_id, **self._security}
        self._producer = AIOKafkaProducer(
            acks="all", linger_ms=0, request_timeout_ms=int(self.timing.send_timeout * 1000), **common
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, fetch_max_wait_ms=50, auto_offset_reset="earliest", **common
        )
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        self._catch_up_to = (await self._consumer.end_offsets([self._tp]))[self._tp]
        self.gate.set_quota(0)
        for name, coro in (("read", self._read_loop()), ("tick", self._tick_loop())):
            task = asyncio.create_task(coro, name=f"ingestor-exchange-{name}")
            task.add_done_callback(on_failure)
            self._tasks.append(task)
        log.info("budget demand exchange started", extra={"topic": self.topic, "member": self.member})

    async def stop(self) -> None:
        """Stop publishing, write a tombstone (peers take our share back at once), close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sending is not None:
            self._sending.cancel()
            await asyncio.gather(self._sending, return_exceptions=True)
        if self._producer is not None:
            if self._tasks:  # started: withdraw our demand
                with contextlib.suppress(KafkaError, TimeoutError):
                    await asyncio.wait_for(self._send(None), STOP_TIMEOUT_S)
            await self._producer.stop()
        if self._consumer is not None:
            await self._consumer.stop()

    async def _ensure_topic(self) -> None:
        """Create the demand topic when missing; refuse to start (naming the variable) when that fails."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, client_id=self._client_id, **self._security)
        await admin.start()
        try:
            if self.topic in set(await admin.list_topics()):
                return
            brokers = len((await admin.describe_cluster())["brokers"])
            topic = NewTopic(self.topic, 1, min(3, max(1, brokers)), topic_configs=TOPIC_CONFIG)
            response = await admin.create_topics([topic])
            for _, code, *_ in response.topic_errors:
                if code and code != TopicAlreadyExistsError.errno:
                    raise SettingsError(
                        f"INGESTOR_BUDGET_TOPIC: topic {self.topic!r} does not exist and cannot be created "
                        f"(Kafka error {code}); create it with one partition, or set it to off to share by partitions"
                    )
            await self._wait_for_leader(admin)
            log.info("budget demand topic created", extra={"topic": self.topic})
        finally:
            await admin.close()

    async def _wait_for_leader(self, admin: Any) -> None:
        """A new topic's partition needs a leader before the clients use it (bounded wait)."""
        for _ in range(int(TOPIC_READY_TIMEOUT_S / 0.1)):
            described = await admin.describe_topics([self.topic])
            parts = described[0].get("partitions") or [] if described else []
            if any(p.get("leader", -1) >= 0 for p in parts):
                return
            await asyncio.sleep(0.1)

    # ---------------------------------------------------------------- loops

    async def _read_loop(self) -> None:
        consumer, prefix = self._consumer, self._key_prefix
        while True:
            try:
                batch = await consumer.getmany(self._tp, timeout_ms=200)
            except KafkaError as exc:
                log.warning("budget demand topic unreadable", extra={"error": repr(exc)})
                await asyncio.sleep(self.timing.interval)
                continue
            now, oldest_ms = self._clock.monotonic(), (self._clock.time() - self.timing.ttl) * 1000
            for record in batch.get(self._tp, ()):
                key = (record.key or b"").decode("utf-8", "replace")
                if not key.startswith(prefix):
                    continue
                if record.offset < self._catch_up_to and record.timestamp < oldest_ms:
                    continue  # a replica gone before we started (later records always count)
                self._receive(key[len(prefix) :], record.value, now)

    def _receive(self, member: str, raw: bytes | None, now: float) -> None:
        try:
            value = None if raw is None else orjson.loads(raw)
            self.book.received(member, value, now)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed budget demand record", extra={"member": member[:100]})

    async def _tick_loop(self) -> None:
        next_publish = self._clock.monotonic()
        while True:
            now = self._clock.monotonic()
            self._tick(now)
            if now >= next_publish:
                next_publish = now + self.timing.interval
                self._publish(now)
            await asyncio.sleep(self.timing.tick)

    def _tick(self, now: float) -> None:
        gate, budget = self.gate, self.gate.budget
        blocked = gate.waiters >= 2 or (gate.waiters >= 1 and budget.quota == 0)
        self.meter.sample(budget.reservations_total, blocked=blocked, now=now)
        self.demand = self.meter.demand(self.units, now)
        owned, partitions = self._ownership()
        before = self.decision.mode
        inputs = Inputs(self.demand, owned, partitions, self.units)
        self.decision = self.book.decide(inputs, now, self._clock.time())
        if self.decision.mode is Mode.FALLBACK:
            gate.set_share(owned, partitions)
        else:
            gate.set_quota(self.decision.quota)
        if self.decision.mode is not before:
            log.warning(
                "budget exchange mode changed",
                extra={"from": before.value, "to": self.decision.mode.value, "topic": self.topic},
            )

    def _publish(self, now: float) -> None:
        if self._sending is not None and not self._sending.done():
            return  # the last write has not been answered yet
        mode = self.book.mode
        if mode is Mode.EXCHANGE:
            self._left = False
            owned, _ = self._ownership()
            value = self.book.next_record(self.demand, owned, now)
            self._sending = asyncio.create_task(self._send_demand(value))
        elif mode is Mode.LEAVING and not self._left:
            self._sending = asyncio.create_task(self._send_tombstone())

    async def _send_demand(self, value: dict[str, int]) -> None:
        try:
            await asyncio.wait_for(self._send(orjson.dumps(value)), self.timing.send_timeout)
        except (KafkaError, TimeoutError) as exc:
            log.warning("cannot publish budget demand", extra={"error": repr(exc)})
            return
        self.book.acked(value["seq"], self._clock.monotonic())

    async def _send_tombstone(self) -> None:
        try:
            await asyncio.wait_for(self._send(None), self.timing.send_timeout)
        except (KafkaError, TimeoutError) as exc:
            log.warning("cannot withdraw budget demand", extra={"error": repr(exc)})
            return
        self._left = True
        self.book.tombstone_acked(self._clock.monotonic())

    async def _send(self, value: bytes | None) -> None:
        key = (self._key_prefix + self.member).encode()
        await self._producer.send_and_wait(self.topic, value=value, key=key, partition=0)


def from_settings(
    settings: Settings, gate: BudgetGate, ownership: Callable[[], tuple[int, int]], clock: Clock
) -> DemandExchange | None:
    """The exchange the settings ask for; None when INGESTOR_BUDGET_TOPIC is off (share by partitions)."""
    if not settings.budget_topic:
        return None
    return DemandExchange(
        topic=settings.budget_topic,
        group_id=settings.group_id,
        client_id=settings.client_id,
        bootstrap_servers=settings.bootstrap_servers,
        security=settings.kafka_security(),
        gate=gate,
        headroom=settings.budget_headroom,
        ownership=ownership,
        clock=clock,
        timing=Timing(interval=settings.budget_exchange_interval_s),
    )
