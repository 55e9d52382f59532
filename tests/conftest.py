"""Fixtures every test folder may use: the session's real Kafka broker and fresh topics on it."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

import pytest

from ingestor_dev.devkafka import LocalKafka, create_topic

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator
    from typing import Protocol

    class TopicFactory(Protocol):
        def __call__(
            self, partitions: int = 1, prefix: str = "t", *, config: dict[str, str] | None = None
        ) -> Awaitable[str]: ...


#: Reuse a broker that already runs (e.g. `ingestor kafka up`) instead of starting one per session.
REUSE_ENV = "INGESTOR_TEST_KAFKA_BOOTSTRAP"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The session's broker, started on a free port on first use; a broker that cannot start fails."""
    reused = os.environ.get(REUSE_ENV)
    if reused:
        yield reused
        return
    with LocalKafka() as broker:
        yield broker.bootstrap


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> TopicFactory:
    """``await topic_factory(6)``: a new uniquely named topic with 6 partitions, all with a leader.

    A plain function, so that it runs on whichever event loop the test uses; each call opens and closes
    its own admin client.
    """

    async def create(partitions: int = 1, prefix: str = "t", *, config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        await create_topic(kafka_bootstrap, name, partitions, config=config)
        return name

    return create
