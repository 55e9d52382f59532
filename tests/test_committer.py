"""The committer's loop at shutdown: stopping it never cuts a commit short.

A dead-letter transaction cancelled after the broker committed it would hand its letters back to be
written again by the final commit (a duplicate for a read_committed reader), so the loop's commit is
shielded and the final commit waits for it on the commit lock.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from ingestor.committer import Committer


def committer() -> Committer:
    nothing = SimpleNamespace()
    return Committer(
        consumer=nothing,
        tracker=nothing,  # type: ignore[arg-type]
        dead_letters=nothing,  # type: ignore[arg-type]
        transactions=None,
        metrics=nothing,  # type: ignore[arg-type]
        health=nothing,  # type: ignore[arg-type]
    )


async def test_stopping_the_loop_lets_a_commit_in_progress_finish() -> None:
    c = committer()
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def slow_commit(only: object = None) -> None:
        del only
        async with c._commit_lock:
            started.set()
            await release.wait()  # the broker is committing the transaction
            finished.append("loop's commit")

    c.commit = slow_commit  # type: ignore[method-assign]
    loop = asyncio.create_task(c.commit_loop(1, lambda: None))
    await asyncio.wait_for(started.wait(), 5)
    loop.cancel()  # shutdown stops the background tasks
    await asyncio.gather(loop, return_exceptions=True)
    release.set()
    async with asyncio.timeout(5):  # the final commit takes the lock after the loop's commit is done
        async with c._commit_lock:
            finished.append("final commit")
    assert finished == ["loop's commit", "final commit"]
