"""RedisPinStore: the pin store shared by every worker and node (``redis://``, ``rediss://``, ``unix://``).

Key schema (``P`` = ``key_prefix``, default ``affinity:``):

- ``P pin:<user_key>``   string, the instance id; PX = the pin's sliding TTL.
- ``P idx:<instance>``   sorted set, member = user key, score = the pin's expiry (server unix ms).
- ``P instances``        set of instance ids that may have a non-empty index.

Shared membership state lives under the same prefix (schema in ``membership.redis_shared``):
``P drain``, ``P hb:<instance>``, ``P hb-instances`` and ``P lock:<name>``.

The index lets ``list(instance)``, ``counts()`` and ``drop_instance()`` work without SCAN. Every
mutation that touches a pin and an index is one Lua script (``pins.redis_scripts``), so the index
never disagrees with the pins except for expiry, which scores encode; stale entries are trimmed by
``counts()`` and ``drop_instance()``. ``touch`` is batched: it only records the pin in memory, and a
single background flush per ``touch_interval`` refreshes the whole batch in one script call.

Connections: one bounded pool per store (``max_connections``, default 50); a call waits at most
``timeout`` for a free connection, so a burst queues instead of opening a socket per request.

Failure handling: socket timeouts of ``timeout`` seconds, one immediate retry on a dropped connection
(a Redis restart leaves stale pooled sockets), then a circuit breaker (``pins.redis_breaker``): while
Redis is down calls raise ``PinStoreUnavailable`` without I/O, and one probe per backoff window
(0.1 s doubling to 5 s) checks whether it is back. Logs one line when Redis goes down and one when it
returns (logger ``affinity_proxy.pins.redis``). Imports ``routing.model``, ``pins.*`` and
``_tasks`` only; never the web layer.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis import exceptions as rexc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from affinity_proxy._tasks import TaskSet
from affinity_proxy.pins import redis_scripts as lua
from affinity_proxy.pins.redis_breaker import CircuitBreaker
from affinity_proxy.pins.redis_touch import TouchBatcher
from affinity_proxy.pins.store import ClaimResult, Pin, PinStoreUnavailable
from affinity_proxy.routing.model import InstanceId

log = logging.getLogger("affinity_proxy.pins.redis")

T = TypeVar("T")

# Errors meaning "Redis cannot serve us right now" (as opposed to a bug in a script or a call).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError (LOADING), AuthenticationError, MaxConnectionsError
    rexc.TimeoutError,
    rexc.ReadOnlyError,  # failed-over primary became a replica
    rexc.OutOfMemoryError,
    rexc.TryAgainError,
    rexc.ClusterDownError,  # includes MasterDownError
    OSError,  # includes the builtin TimeoutError
)
_TRANSIENT_PREFIXES = ("MISCONF", "BUSY ", "NOREPLICAS", "LOADING", "MASTERDOWN")
TOUCH_BATCH = 1000  # (user, instance) pairs per script call: bounds how long one call blocks Redis
DROP_BATCH = 500  # index members visited per drop_instance script call
HEALTH_CHECK_INTERVAL = 15  # seconds idle before a pooled connection is PINGed before reuse


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(_TRANSIENT_PREFIXES)


def describe_url(url: str) -> str:
    """Where a Redis URL points, without credentials (for log lines)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}"


class RedisPinStore:
    """PinStore on one Redis. One round trip per call, except ``list(None)`` (one per instance) and
    ``drop_instance`` (one per ``DROP_BATCH`` pins). ``touch`` costs no I/O at the call site.

    ``available``: False while the circuit is open. ``errors``: operations that raised
    ``PinStoreUnavailable`` (fast failures included). ``on_error(op)`` is called for each of them and
    ``on_state_change(up)`` on each transition; both run inline and must not block.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "affinity:",
        pin_ttl: float,
        timeout: float = 0.25,
        touch_interval: float | None = None,
        tasks: TaskSet | None = None,
        on_error: Callable[[str], None] | None = None,
        on_state_change: Callable[[bool], None] | None = None,
        max_pending_touches: int = 100_000,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        max_connections: int = 50,
    ) -> None:
        if pin_ttl <= 0 or timeout <= 0:
            raise ValueError("pin_ttl and timeout must be positive")
        self.url = url
        self.where = describe_url(url)
        self.prefix = key_prefix
        self.pin_ttl = pin_ttl
        self._ttl_ms = max(1, round(pin_ttl * 1000))
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,  # longest wait for a free pooled connection
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=HEALTH_CHECK_INTERVAL,
            retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
            client_name="affinity-proxy",
        )
        self._client: Redis = Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._own_tasks = tasks is None
        self._tasks = tasks if tasks is not None else TaskSet()
        self._on_error = on_error
        self._on_state_change = on_state_change
        self._breaker = CircuitBreaker(base=backoff_base, cap=backoff_cap)
        self._down_since = 0.0
        self.errors = 0
        self._touches = TouchBatcher(
            self._write_touches,
            interval=touch_interval if touch_interval is not None else min(pin_ttl / 10, 5.0),
            tasks=self._tasks,
            max_pending=max_pending_touches,
        )
        self._closed = False
        self._instances_key = f"{key_prefix}instances"
        self._scripts = {name: self._client.register_script(src) for name, src in lua.SCRIPTS.items()}

    @property
    def available(self) -> bool:
        return self._breaker.available

    @property
    def touch_interval(self) -> float:
        return self._touches.interval

    @property
    def pending_touches(self) -> int:
        return len(self._touches)

    @property
    def client(self) -> Redis:
        """The store's client (and so its pool), for other shared state on the same Redis
        (``membership.redis_shared``). Call it only through ``call`` so outages hit the breaker."""
        return self._client

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` (one Redis round trip) behind this store's circuit breaker: a Redis outage
        raises ``PinStoreUnavailable``, counts under ``op`` in ``on_error`` and opens the circuit for
        every user of this Redis. Other Redis errors (a bad script) propagate unchanged."""
        return await self._call(op, fn)

    # -- plumbing --

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]], *, force: bool = False) -> T:
        """Run ``fn`` through the circuit breaker, mapping Redis outages to PinStoreUnavailable."""
        if self._closed:
            raise PinStoreUnavailable("redis pin store is closed")
        token = self._breaker.admit(force=force)
        if token is None:
            self._count_error(op)
            raise PinStoreUnavailable(f"redis at {self.where} is unavailable (circuit open)")
        try:
            result = await fn()
        except Exception as exc:
            if not _is_unavailable(exc):
                self._succeeded(token)  # Redis answered; the error is the caller's, not an outage
                raise
            self._count_error(op)
            if self._breaker.failed(token):
                self._down_since = time.monotonic()
                log.warning(
                    "redis pin store at %s is down (%s: %s); failing fast with backoff",
                    self.where,
                    type(exc).__name__,
                    exc,
                )
                self._notify(False)
            raise PinStoreUnavailable(f"redis {op} failed at {self.where}: {exc}") from exc
        except BaseException:
            self._breaker.abandon(token)  # cancelled: let the next caller probe
            raise
        self._succeeded(token)
        return result

    def _succeeded(self, token: int) -> None:
        if self._breaker.succeeded(token):
            log.info("redis pin store at %s is back after %.1fs", self.where, time.monotonic() - self._down_since)
            self._notify(True)

    def _count_error(self, op: str) -> None:
        self.errors += 1
        if self._on_error is not None:
            try:
                self._on_error(op)
            except Exception:
                log.exception("on_error callback failed")

    def _notify(self, up: bool) -> None:
        if self._on_state_change is not None:
            try:
                self._on_state_change(up)
            except Exception:
                log.exception("on_state_change callback failed")

    def _pin_key(self, user_key: str) -> str:
        return f"{self.prefix}pin:{user_key}"

    def _script(self, name: str, keys: builtins.list[str], args: builtins.list[Any]) -> Awaitable[Any]:
        return self._scripts[name](keys=keys, args=args)

    def _pin(self, user_key: str, instance: str, pttl: int) -> Pin:
        return Pin(user_key, InstanceId(instance), pttl / 1000 if pttl >= 0 else None)

    async def _mutate(self, op: str, user_key: str, args: builtins.list[Any]) -> ClaimResult:
        keys = [self._pin_key(user_key), self._instances_key]
        won, instance, pttl = await self._call(op, lambda: self._script(op.upper(), keys, args))
        return ClaimResult(self._pin(user_key, instance, int(pttl)), won=bool(won))

    # -- PinStore --

    async def get(self, user_key: str) -> Pin | None:
        instance, pttl = await self._call("get", lambda: self._script("GET", [self._pin_key(user_key)], []))
        if instance is None or pttl == -2:
            return None
        return self._pin(user_key, instance, int(pttl))

    async def claim(self, user_key: str, instance: InstanceId) -> ClaimResult:
        return await self._mutate("claim", user_key, [self.prefix, user_key, instance, self._ttl_ms])

    async def repin(self, user_key: str, expected: InstanceId | None, instance: InstanceId) -> ClaimResult:
        """Compare-and-set. A pin that is already gone (expired, dropped, reaped) counts as matching
        any ``expected``: the caller wanted it replaced, and ``ClaimResult`` cannot carry "no pin"."""
        args = [self.prefix, user_key, expected or "", instance, self._ttl_ms]
        return await self._mutate("repin", user_key, args)

    async def set(self, user_key: str, instance: InstanceId) -> Pin:
        return (await self._mutate("set", user_key, [self.prefix, user_key, instance, self._ttl_ms])).pin

    async def drop(self, user_key: str, expected: InstanceId | None = None) -> bool:
        args = [self.prefix, user_key, expected or ""]
        return bool(await self._call("drop", lambda: self._script("DROP", [self._pin_key(user_key)], args)))

    async def touch(self, user_key: str, instance: InstanceId) -> None:
        """Record the use; no I/O here (ignored once closed). A background flush (``pins.redis_touch``)
        refreshes every pending pin in one script call once ``touch_interval`` has passed since the
        last flush; batches over ``TOUCH_BATCH`` pins go as one pipeline of script calls."""
        self._touches.add(user_key, instance)

    async def _write_touches(self, batch: dict[str, InstanceId]) -> None:
        flat = [item for pair in batch.items() for item in pair]
        chunks = [flat[i : i + 2 * TOUCH_BATCH] for i in range(0, len(flat), 2 * TOUCH_BATCH)]

        async def write() -> None:
            if len(chunks) == 1:
                await self._script("TOUCH", [], [self.prefix, self._ttl_ms, *chunks[0]])
                return
            async with self._client.pipeline(transaction=False) as pipe:
                for chunk in chunks:
                    await self._scripts["TOUCH"](keys=[], args=[self.prefix, self._ttl_ms, *chunk], client=pipe)
                await pipe.execute()

        await self._call("touch", write)

    async def flush(self) -> None:
        """Write pending touches now (shutdown). Raises PinStoreUnavailable; the batch is kept."""
        await self._touches.flush()

    async def list(self, instance: InstanceId | None = None, limit: int = 1000) -> builtins.list[Pin]:
        """Live pins from the index, confirmed against the pins themselves. Order: by expiry per
        instance, instances in name order."""
        if instance is None:
            names = await self._call("list", lambda: self._client.smembers(self._instances_key))
            pins: builtins.list[Pin] = []
            for name in sorted(names):
                if len(pins) >= limit:
                    break
                pins.extend(await self.list(InstanceId(name), limit - len(pins)))
            return pins
        if limit <= 0:
            return []
        flat = await self._call("list", lambda: self._script("LIST", [], [self.prefix, instance, limit]))
        return [self._pin(flat[i], instance, int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def counts(self) -> dict[InstanceId, int]:
        flat = await self._call("counts", lambda: self._script("COUNTS", [self._instances_key], [self.prefix]))
        return {InstanceId(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def drop_instance(self, instance: InstanceId) -> builtins.list[str]:
        """Batches of ``DROP_BATCH`` index members, each one atomic script call."""
        dropped: builtins.list[str] = []
        args = [self.prefix, instance, DROP_BATCH]
        while True:
            left, users = await self._call(
                "drop_instance", lambda: self._script("DROP_INSTANCE", [self._instances_key], args)
            )
            dropped.extend(users)
            if int(left) == 0:
                return dropped

    async def ping(self) -> bool:
        """Goes to Redis even while the circuit is open (health checks want the truth), and a success
        closes the circuit. Never raises."""
        try:
            return bool(await self._call("ping", self._client.ping, force=True))
        except PinStoreUnavailable:
            return False
        except rexc.RedisError as exc:  # e.g. NOPERM: Redis is there but will not serve us
            log.warning("redis pin store at %s refused PING: %s", self.where, exc)
            return False

    async def close(self) -> None:
        """Stop the touch flusher and close the connection pool. Pending touches are not written:
        call ``flush()`` first. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._touches.close()
        if self._own_tasks:
            await self._tasks.close()
        await self._client.aclose()
