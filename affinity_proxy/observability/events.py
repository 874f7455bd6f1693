"""RecentEvents: what this process did lately, for the live dashboard (not for Prometheus).

A per-second time series of the last ``seconds`` seconds (requests, replays, responses with the
replay status, re-pins) kept in fixed-size slot arrays indexed by ``second % seconds``, and a ring
buffer of the last ``max_repins`` re-pins. Recording is O(1) with no locks and no allocation beyond
one tuple per re-pin: one event loop owns a ``RecentEvents`` (every worker has its own), so nothing
here is shared between threads. Re-pins are recorded without the user key.

Imports only the stdlib and ``routing.decide`` (pure); no aiohttp, no I/O.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from affinity_proxy.routing.decide import DecisionReason, Route

DEFAULT_SECONDS = 600
DEFAULT_MAX_REPINS = 100
SERIES = ("requests", "replays", "replay_status", "repins")


class RecentEvents:
    """Recent per-second counts and re-pins of one process.

    ``clock`` returns wall-clock seconds (``time.time`` by default; tests pass their own). Slots older
    than ``seconds`` are reused: a slot whose stamp is not the current second is zeroed on first use,
    so quiet seconds read as 0 without any background task.
    """

    __slots__ = ("_clock", "_recent", "_repins", "_replay_status", "_replays", "_requests", "_seconds", "_stamp")

    def __init__(self, *, seconds: int = DEFAULT_SECONDS, max_repins: int = DEFAULT_MAX_REPINS,
                 clock: Callable[[], float] = time.time) -> None:
        if seconds < 1 or max_repins < 1:
            raise ValueError("seconds and max_repins must be positive")
        self._seconds = seconds
        self._clock = clock
        self._stamp = [-1] * seconds
        self._requests = [0] * seconds
        self._replays = [0] * seconds
        self._replay_status = [0] * seconds
        self._repins = [0] * seconds
        #: (wall-clock time, new instance, repin reason, previous instance or None)
        self._recent: deque[tuple[float, str, str, str | None]] = deque(maxlen=max_repins)

    @property
    def seconds(self) -> int:
        return self._seconds

    def _slot(self, now: float) -> int:
        second = int(now)
        i = second % self._seconds
        if self._stamp[i] != second:
            self._stamp[i] = second
            self._requests[i] = self._replays[i] = self._replay_status[i] = self._repins[i] = 0
        return i

    def response(self, replay_status: bool) -> None:
        """One client request answered; ``replay_status``: its status was ``fly.replay_status``
        (409 by default), whether a replay or the app's own answer. O(1)."""
        second = int(self._clock())  # ``_slot``, inlined: this runs once per request
        i = second % self._seconds
        if self._stamp[i] != second:
            self._stamp[i] = second
            self._requests[i] = self._replays[i] = self._replay_status[i] = self._repins[i] = 0
        self._requests[i] += 1
        if replay_status:
            self._replay_status[i] += 1

    def responses(self, count: int, replay_status: bool) -> None:
        """``response(replay_status)`` ``count`` times (a batch counted together: ``Tally``)."""
        i = self._slot(self._clock())
        self._requests[i] += count
        if replay_status:
            self._replay_status[i] += count

    def replay_answered(self, now: float) -> None:
        """``route("replay", r)`` then ``response(True)`` for a replay whose route is no re-pin (the
        replay lane's answers: its routes come from the hot-route cache, which holds cookie and
        force routes only), with the caller's clock reading and one slot look-up."""
        i = self._slot(now)
        self._replays[i] += 1
        self._requests[i] += 1
        self._replay_status[i] += 1

    def route(self, action: str, route: Route) -> None:
        """A routing decision carried out (``action`` "forward" or "replay"). Counts replays and
        records re-pins (``repin`` with its ``repin_reason``, and the fly loop guard). O(1)."""
        reason = route.reason
        if action != "replay" and reason is not DecisionReason.REPIN and reason is not DecisionReason.LOOP_GUARD:
            return
        now = self._clock()
        i = self._slot(now)
        if action == "replay":
            self._replays[i] += 1
        if reason is DecisionReason.REPIN or reason is DecisionReason.LOOP_GUARD:
            self._repins[i] += 1
            why = route.repin_reason.value if route.repin_reason is not None else reason.value
            self._recent.append((now, route.instance, why, route.orphan))

    def snapshot(self, seconds: int | None = None) -> dict[str, Any]:
        """The last ``seconds`` (default: all kept) whole seconds up to now, oldest first, plus the
        recent re-pins newest first. O(seconds + max_repins); JSON-ready."""
        n = self._seconds if seconds is None else max(1, min(seconds, self._seconds))
        now = int(self._clock())
        start = now - n + 1
        series: dict[str, list[int]] = {name: [] for name in SERIES}
        arrays = (self._requests, self._replays, self._replay_status, self._repins)
        for second in range(start, now + 1):
            i = second % self._seconds
            fresh = self._stamp[i] == second
            for name, values in zip(SERIES, arrays, strict=True):
                series[name].append(values[i] if fresh else 0)
        return {
            "now": now,
            "start": start,
            "seconds": n,
            "series": series,
            "totals": {name: sum(values) for name, values in series.items()},
            "recent_repins": [
                {"at": round(at, 3), "instance": instance, "reason": why, "from": previous}
                for at, instance, why, previous in reversed(self._recent)
            ],
        }
