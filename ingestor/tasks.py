"""The worker's background tasks, owned in one place: each is named, the failure of one stops them all,
and stopping them is bounded.

A task that fails (raises) is logged and calls `on_failure` (the worker's stop: it stops fetching, drains
and ends the other tasks through `stop`). `stop` cancels every task and waits at most `limit` seconds: a
task that does not end must not keep the worker past its grace period (what it held is redelivered, with
the same identifiers); the tasks that did not stop are named in the log.

Not `asyncio.TaskGroup`: a TaskGroup cancels its siblings the moment one fails (no drain of the work in
flight), raises an ExceptionGroup instead of the task's error, and its exit waits without bound for a
task that ignores its cancellation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

log = logging.getLogger("ingestor.tasks")


class TaskOwner:
    """Every background task of one worker run."""

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self._on_failure = on_failure
        self._tasks: list[asyncio.Task[Any]] = []

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` as the task `ingestor-<name>`."""
        task = asyncio.create_task(coro, name=f"ingestor-{name}")
        task.add_done_callback(self.on_done)
        self._tasks.append(task)

    def on_done(self, task: asyncio.Task[Any]) -> None:
        """A task ended: one that failed stops the worker (also the callback of tasks a component owns)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed; stopping", exc_info=task.exception())
            self._on_failure()

    async def stop(self, limit: float) -> list[BaseException | None]:
        """Cancel the tasks and wait for them, at most `limit` seconds; the outcome of each that ended."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return []
        done, stuck = await asyncio.wait(tasks, timeout=limit)
        if stuck:
            log.error("background tasks did not stop in time", extra={"tasks": sorted(t.get_name() for t in stuck)})
        return [None if t.cancelled() else t.exception() for t in done]
