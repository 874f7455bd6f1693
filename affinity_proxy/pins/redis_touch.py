"""TouchBatcher: turn many ``touch`` calls into one store write per interval.

Why: every proxied request slides its pin's TTL, and one Redis write per request would make the
store the bottleneck. ``add`` only records ``user_key -> instance`` in a dict (latest wins, O(1), no
I/O). One background task (spawned on the TaskSet, never more than one alive) writes the whole dict
through ``write`` once ``interval`` has passed since the previous write, and keeps going while more
touches arrive. A failed write puts the batch back (newer touches win) so a short outage costs no
TTL refresh; ``max_pending`` bounds the memory that an outage can pin down.

Imports ``_tasks``, ``pins.store`` and ``routing.model`` only. One event loop; no locks needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from affinity_proxy._tasks import TaskSet
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.routing.model import InstanceId

log = logging.getLogger("affinity_proxy.pins.redis")

Batch = dict[str, InstanceId]


class TouchBatcher:
    """Pending TTL refreshes plus the single flusher task that writes them."""

    def __init__(
        self,
        write: Callable[[Batch], Awaitable[None]],
        *,
        interval: float,
        tasks: TaskSet,
        max_pending: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("touch_interval must be positive")
        self.interval = interval
        self.max_pending = max_pending
        self.dropped = 0  # touches discarded because max_pending was reached
        self._write = write
        self._tasks = tasks
        self._clock = clock
        self._pending: Batch = {}
        self._last_flush = float("-inf")
        self._flusher: asyncio.Task[Any] | None = None
        self._closed = False
        self._writing = asyncio.Lock()  # one write in flight, background or explicit

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, user_key: str, instance: InstanceId) -> None:
        """Record a use; starts the flusher when none is alive. Never does I/O."""
        if self._closed:
            return
        if len(self._pending) >= self.max_pending and user_key not in self._pending:
            self.dropped += 1
            return
        self._pending[user_key] = instance
        if self._flusher is None or self._flusher.done():
            self._flusher = self._tasks.spawn(self._run(), name="pins.redis.touch-flush")

    async def _run(self) -> None:
        while self._pending and not self._closed:
            delay = self._last_flush + self.interval - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self.flush()
            except PinStoreUnavailable as exc:
                # Counted and logged (once per outage) by the store; the batch is pending again.
                log.debug("touch flush deferred: %s", exc)

    async def flush(self) -> None:
        """Write everything pending now, after any write already in flight (so on shutdown nothing
        is left half-written). Raises what ``write`` raises, after restoring the batch."""
        async with self._writing:
            batch, self._pending = self._pending, {}
            self._last_flush = self._clock()
            if not batch:
                return
            try:
                await self._write(batch)
            except BaseException:
                self._restore(batch)
                raise

    def _restore(self, batch: Batch) -> None:
        for key, instance in batch.items():
            if key in self._pending:
                continue  # a newer touch of the same key wins
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
            else:
                self._pending[key] = instance

    async def close(self) -> None:
        """Stop the flusher without writing (call ``flush`` first to keep pending touches)."""
        self._closed = True
        if self._pending:
            log.debug("closing with %d unflushed touches", len(self._pending))
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
