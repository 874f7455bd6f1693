"""open_pin_store: turn ``store.url`` into a PinStore. The one place that knows the URL schemes.

``memory://`` -> MemoryPinStore (one process); ``redis://``, ``rediss://`` (TLS), ``unix://``,
``redis+cluster://`` (Redis Cluster) and ``redis+sentinel://`` (Sentinel) -> RedisPinStore.
Opening does no I/O: Redis connects lazily on the first call, so a Redis that is down at start-up
degrades like one that goes down later. Imports only ``pins.*`` and ``_tasks``.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from affinity_proxy._tasks import TaskSet
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStore

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+cluster", "redis+sentinel"})


def open_pin_store(
    url: str,
    *,
    key_prefix: str,
    pin_ttl: float,
    timeout: float,
    tasks: TaskSet | None = None,
    on_error: Callable[[str], None] | None = None,
    on_state_change: Callable[[bool], None] | None = None,
) -> PinStore:
    """A PinStore for ``url``. Raises ValueError naming the accepted schemes for anything else.

    ``key_prefix``, ``timeout``, ``tasks`` and the callbacks only matter to Redis; the memory store
    never fails, so it never calls them.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryPinStore(pin_ttl)
    if scheme in REDIS_SCHEMES:
        return RedisPinStore(
            url,
            key_prefix=key_prefix,
            pin_ttl=pin_ttl,
            timeout=timeout,
            tasks=tasks,
            on_error=on_error,
            on_state_change=on_state_change,
        )
    shown = f"{scheme}://" if scheme else repr(url)
    raise ValueError(
        f"unsupported pin store URL scheme {shown}: use memory://, redis://host:port/db, "
        "rediss://host:port/db (TLS), unix:///path/to/redis.sock, redis+cluster://host:port[,host:port...] "
        "or redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db]"
    )
