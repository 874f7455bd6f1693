"""Circuit breaker for the Redis pin store: fail fast while Redis is known to be down.

Why: the request path calls the pin store on cache misses. When Redis is down every call would wait
up to the socket timeout; with a breaker only one call per backoff window (the *probe*) touches the
network and every other call fails at once, so the proxy degrades to the ring without piling up
waiting requests. The window starts at ``base`` seconds, doubles after each failed probe up to
``cap``, and is jittered downwards (never longer than ``cap``) so that the workers of a node do not probe in lock step.

Pure bookkeeping: no I/O, no asyncio, no locks (one event loop calls it). Imports only the stdlib.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class CircuitBreaker:
    """Closed (``available``) or open with a deadline; half-open while one probe is in flight.

    Protocol for callers: ``admit()`` before the I/O (False: fail fast without I/O), then exactly one
    of ``succeeded(token)`` / ``failed(token)`` / ``abandon(token)`` with the token ``admit`` returned. Cost: O(1).
    """

    def __init__(
        self,
        *,
        base: float = 0.1,
        cap: float = 5.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.available = True
        self._level = 0  # failed probes since the circuit opened
        self._open_until = 0.0
        self._probing = False
        self.window = 0.0  # length of the current (last) backoff window, for tests and logs

    def admit(self, *, force: bool = False) -> int | None:
        """May a call go to the network now? Returns a token for ``succeeded``/``failed``, or None.

        Tokens: 0 = normal call while closed (or a forced call), 1 = the probe. ``force`` lets a health
        check through even while open; it is not treated as the probe, so it neither delays nor
        lengthens the window, but its success closes the circuit.
        """
        if self.available or force:
            return 0
        if self._probing or self._clock() < self._open_until:
            return None
        self._probing = True
        return 1

    def succeeded(self, token: int) -> bool:
        """Record a success. True when this closed the circuit (Redis came back)."""
        if token == 1:
            self._probing = False
        if self.available:
            return False
        self.available = True
        self._level = 0
        self._probing = False
        return True

    def failed(self, token: int) -> bool:
        """Record a failure. True when this opened the circuit (Redis went down).

        A failure of a call that was already in flight when the circuit opened does not lengthen the
        window; only a failed probe doubles it.
        """
        if self.available:
            self.available = False
            self._level = 0
            self._open(self._clock())
            return True
        if token == 1:
            self._probing = False
            self._level += 1
            self._open(self._clock())
        return False

    def abandon(self, token: int) -> None:
        """The call ended without an answer either way (cancelled): free the probe slot."""
        if token == 1:
            self._probing = False

    def _open(self, now: float) -> None:
        window = min(self.cap, self.base * (2 ** min(self._level, 32)))
        self.window = window * self._rng.uniform(1.0 - self.jitter, 1.0)
        self._open_until = now + self.window
