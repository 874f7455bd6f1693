"""wait_until: poll a condition against a deadline instead of sleeping for a guessed duration."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 5.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.01,
    message: str | None = None,
) -> Any:
    """Call ``predicate`` (sync or async) until it returns something truthy, and return that value.

    Raises AssertionError after ``timeout`` seconds, with ``message`` and the last value seen.
    The predicate is always evaluated at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message or 'condition'} not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)
