"""MoveBudget: how many idle anonymous sessions this process may move now (issue #14).

A token bucket refilled at ``placement.rebalance.max_moves_per_minute`` a minute and holding at most
five seconds' worth (at least one), so moves trickle instead of arriving in a burst after a quiet
spell. Per process: the leader-only loop's budget for stored pins is separate (it is cluster-wide
through the rebalance lock), so N processes may move up to N x the rate of anonymous sessions.
One event loop; no locking.
"""

from __future__ import annotations

import time
from collections.abc import Callable

BURST_SECONDS = 5.0


class MoveBudget:
    """``take()``: True (and one move spent) when a move is available now."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * BURST_SECONDS)
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()
        self.spent = 0

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self.spent += 1
        return True
