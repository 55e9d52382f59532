"""The worker's background tasks: named, a failure stops the worker, stopping them is bounded."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ingestor.tasks import TaskOwner

if TYPE_CHECKING:
    import pytest


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_failing_task_is_logged_and_stops_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    stopped = asyncio.Event()
    owner = TaskOwner(stopped.set)

    async def fails() -> None:
        raise RuntimeError("boom")

    owner.spawn("fails", fails())
    owner.spawn("waits", forever())
    await asyncio.wait_for(stopped.wait(), 10)
    assert "background task failed; stopping" in caplog.messages
    results = await owner.stop(10)
    assert sorted(repr(r) for r in results) == sorted(["None", repr(RuntimeError("boom"))])


async def test_stopping_is_bounded_and_names_a_task_that_does_not_stop(caplog: pytest.LogCaptureFixture) -> None:
    """Before, a task that swallowed its cancellation kept the worker past its grace period."""
    owner = TaskOwner(lambda: None)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # ignores being cancelled

    owner.spawn("stubborn", stubborn())
    owner.spawn("polite", forever())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="ingestor.tasks"):
        results = await owner.stop(0.05)
    assert results == [None]  # the polite one, cancelled
    [record] = [r for r in caplog.records if r.message == "background tasks did not stop in time"]
    assert record.tasks == ["ingestor-stubborn"]  # type: ignore[attr-defined]
    release.set()
    await asyncio.sleep(0.01)


async def test_stop_without_tasks_returns_at_once() -> None:
    assert await TaskOwner(lambda: None).stop(10) == []
