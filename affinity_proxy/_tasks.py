"""Background-task helper: the one place allowed to call ``asyncio.create_task``.

A task whose reference is dropped can be garbage-collected mid-flight, and an exception in a task
nobody awaits is lost. ``spawn`` keeps a strong reference until the task ends and logs any crash.
Imports nothing of ours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("affinity_proxy.tasks")

#: Seconds a cancelled task gets to end before ``TaskSet.close`` cancels it again.
RECANCEL_AFTER = 1.0


class TaskSet:
    """Owns background tasks: keeps references, logs crashes, cancels all on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.crashes = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.crashes += 1
            log.error("background task %s crashed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait for them to finish.

        A task still running ``RECANCEL_AFTER`` seconds after its cancel had the CancelledError
        swallowed on the way (seen in redis-py's async client: a command cancelled in flight
        returned normally, and the refresh loop around it went on sleeping and polling), so it is
        cancelled again, and logged, until it ends: a shutdown must not wait for ever on it."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        while tasks:
            _done, pending = await asyncio.wait(tasks, timeout=RECANCEL_AFTER)
            for task in pending:
                log.warning("background task %s survived its cancellation; cancelling it again", task.get_name())
                task.cancel()
            tasks = list(pending)
