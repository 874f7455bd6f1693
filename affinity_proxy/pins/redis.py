"""RedisPinStore: the pin store shared by every worker and node: one Redis (``redis://``, ``rediss://``,
``unix://``), Redis Cluster (``redis+cluster://``) or a Sentinel-managed primary (``redis+sentinel://``).

Key schema (``P`` = ``key_prefix``, default ``affinity:``). Pins are spread over ``BUCKETS`` buckets
(``N`` = crc32(user key) mod ``BUCKETS``); every key of a bucket carries the hash tag ``{pN}``, so one
bucket lives in one Redis Cluster slot and every script touches one slot:

- ``P pin:{pN}<user_key>``  string, the instance id; PX = the pin's sliding TTL.
- ``P idx:{pN}<instance>``  sorted set, member = user key, score = the pin's expiry (server unix ms).
- ``P instances{pN}``       set of instance ids that may have a non-empty index in bucket N.

Shared membership state lives under the same prefix, all in the one slot of the tag ``{m}`` (schema
in ``membership.redis_shared``). The same layout is used on every kind of Redis, so a store can move
from one Redis to a cluster by copying keys.

Why buckets and not one index per instance: the index entry must change in the same script as the
pin, so it must live in the pin's slot. A fixed number of buckets keeps whole-store reads
(``counts()``, ``list()``, ``drop_instance()``) at ``BUCKETS`` small script calls (pipelined into one
round trip on one Redis; on a cluster, ``FANOUT`` at a time), while 128 slots spread the pins over
the masters of a cluster evenly enough (each of 3 masters holds about a third).

The index lets ``list(instance)``, ``counts()`` and ``drop_instance()`` work without SCAN. Every
mutation that touches a pin and an index is one Lua script (``pins.redis_scripts``), so the index
never disagrees with the pins except for expiry, which scores encode; stale entries are trimmed by
``counts()`` and ``drop_instance()``. ``touch`` is batched: it only records the pin in memory, and a
single background flush per ``touch_interval`` refreshes the whole batch (one script call per bucket).

Connections: on one Redis (and through Sentinel) one bounded pool per store (``max_connections``,
default 50); a call waits at most ``timeout`` for a free connection, so a burst queues instead of
opening a socket per request. On a cluster, redis-py keeps a pool per node (``max_connections`` each).
Sentinel: the client asks the Sentinels for the current primary and reconnects after a failover;
Cluster: the client follows MOVED/ASK and re-reads the slot map after a failover.

Failure handling: socket timeouts of ``timeout`` seconds, one immediate retry on a dropped connection
(a Redis restart leaves stale pooled sockets), then a circuit breaker (``pins.redis_breaker``): while
Redis is down calls raise ``PinStoreUnavailable`` without I/O, and one probe per backoff window
(0.1 s doubling to 5 s) checks whether it is back. Logs one line when Redis goes down and one when it
returns (logger ``affinity_proxy.pins.redis``). Imports ``routing.model``, ``pins.*`` and
``_tasks`` only; never the web layer.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis import exceptions as rexc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from affinity_proxy._tasks import TaskSet
from affinity_proxy.pins import redis_scripts as lua
from affinity_proxy.pins.redis_breaker import CircuitBreaker
from affinity_proxy.pins.redis_touch import TouchBatcher
from affinity_proxy.pins.redis_url import CLUSTER_SCHEME, SENTINEL_SCHEME, parse_distributed_url
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
    rexc.SlotNotCoveredError,  # a cluster master is gone and no replica took over yet
    OSError,  # includes the builtin TimeoutError
)
_TRANSIENT_PREFIXES = ("MISCONF", "BUSY ", "NOREPLICAS", "LOADING", "MASTERDOWN")
TOUCH_BATCH = 1000  # (user, instance) pairs per script call: bounds how long one call blocks Redis
DROP_BATCH = 500  # index members visited per drop_instance script call
HEALTH_CHECK_INTERVAL = 15  # seconds idle before a pooled connection is PINGed before reuse
BUCKETS = 128  # fixed forever for a keyspace: changing it would hide every stored pin
FANOUT = 16  # bucket calls in flight at once on a cluster (per-node pools are not blocking)


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    if isinstance(exc, rexc.RedisClusterException) and "cannot be connected" in str(exc):
        return True  # no seed node answers (redis-py's wording)
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(_TRANSIENT_PREFIXES)


def describe_url(url: str) -> str:
    """Where a Redis URL points, without credentials (for log lines)."""
    parts = urlsplit(url)
    if parts.scheme in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        target = parse_distributed_url(url)
        hosts = ",".join(f"{host}:{port}" for host, port in target.nodes)
        return f"{parts.scheme}://{hosts}" + (f"/{target.master}" if target.master else "")
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}"


def bucket_of(user_key: str) -> int:
    """The bucket of a user key: stable across processes, versions and machines (crc32)."""
    return zlib.crc32(user_key.encode("utf-8", "surrogatepass")) % BUCKETS


def pin_key(prefix: str, user_key: str) -> str:
    """The Redis key of a user's pin (for tools and tests that look at Redis directly)."""
    return f"{prefix}pin:{{p{bucket_of(user_key)}}}{user_key}"


def open_client(url: str, *, timeout: float, max_connections: int) -> tuple[Redis | RedisCluster, list[Redis]]:
    """A redis-py asyncio client for any accepted store URL, and the helper clients to close with it
    (the Sentinel connections). No I/O (connects on first use)."""
    scheme = urlsplit(url).scheme.lower()
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "client_name": "affinity-proxy",
    }
    if scheme == CLUSTER_SCHEME:
        target = parse_distributed_url(url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            max_connections=2 * max_connections,  # per node; RedisPinStore gates at max_connections
            retry=Retry(NoBackoff(), 1),  # one quick retry (MOVED after a failover); then the breaker
            **common,
        )
        return cluster, []
    if scheme == SENTINEL_SCHEME:
        target = parse_distributed_url(url)
        sentinel = Sentinel(
            list(target.nodes),
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
            **common,
        )
        master = sentinel.master_for(
            target.master or "",
            db=target.db,
            username=target.username,
            password=target.password,
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
        )
        return master, list(sentinel.sentinels)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,  # longest wait for a free pooled connection
        retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
        **common,
    )
    return Redis.from_pool(pool), []  # owns the pool: aclose() closes it


class RedisPinStore:
    """PinStore on Redis. One round trip per call on one user's pin (``get``, ``claim``, ``repin``,
    ``set``, ``drop``); whole-store calls visit every bucket (see the module doc). ``touch`` costs no
    I/O at the call site.

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
        self._client: Any
        self._client, self._helpers = open_client(url, timeout=timeout, max_connections=max_connections)
        self.cluster = isinstance(self._client, RedisCluster)
        # Cluster and Sentinel pools raise at max_connections instead of queueing like the single-Redis
        # BlockingConnectionPool: this gate makes a burst wait (at most ``timeout``) for them too.
        self._gate = asyncio.Semaphore(max_connections) if self._helpers or self.cluster else None
        self._timeout = timeout
        self._fanout_width = max(1, min(FANOUT, max_connections))  # per-node pools hold 2 x max_connections
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
    def client(self) -> Any:
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
            result = await self._gated(fn)
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

    async def _gated(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()`` once a connection slot is free; builtin TimeoutError (an outage) after ``timeout``."""
        if self._gate is None:
            return await fn()
        await asyncio.wait_for(self._gate.acquire(), self._timeout)
        try:
            return await fn()
        finally:
            self._gate.release()

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
        return pin_key(self.prefix, user_key)

    def _bucket(self, bucket: int) -> tuple[str, str, str]:
        """(instances set, index base, pin base) of a bucket: all in the slot of its hash tag."""
        tag = f"{{p{bucket}}}"
        return f"{self.prefix}instances{tag}", f"{self.prefix}idx:{tag}", f"{self.prefix}pin:{tag}"

    async def _fanout(self, calls: builtins.list[Callable[[Any], Awaitable[Any]]]) -> builtins.list[Any]:
        """Run one call per bucket: one pipelined round trip on one Redis; on a cluster, ``FANOUT``
        at a time (a cluster pipeline cannot load scripts; each call may need NOSCRIPT recovery)."""
        if not self.cluster:
            async with self._client.pipeline(transaction=False) as pipe:
                for call in calls:
                    await call(pipe)
                return builtins.list(await pipe.execute())
        gate = asyncio.Semaphore(self._fanout_width)

        async def one(call: Callable[[Any], Awaitable[Any]]) -> Any:
            async with gate:
                return await call(self._client)

        return builtins.list(await asyncio.gather(*(one(call) for call in calls)))

    def _bucket_script(self, name: str, bucket: int, extra: builtins.list[Any]) -> Callable[[Any], Awaitable[Any]]:
        instances, idx, pins = self._bucket(bucket)
        args = [idx, pins, *extra]
        return lambda client: self._scripts[name](keys=[instances], args=args, client=client)

    def _script(self, name: str, keys: builtins.list[str], args: builtins.list[Any]) -> Awaitable[Any]:
        return self._scripts[name](keys=keys, args=args)

    def _pin(self, user_key: str, instance: str, pttl: int) -> Pin:
        return Pin(user_key, InstanceId(instance), pttl / 1000 if pttl >= 0 else None)

    async def _mutate(self, op: str, user_key: str, args: builtins.list[Any]) -> ClaimResult:
        instances, idx, _ = self._bucket(bucket_of(user_key))
        keys = [self._pin_key(user_key), instances]
        won, instance, pttl = await self._call(op, lambda: self._script(op.upper(), keys, [idx, *args]))
        return ClaimResult(self._pin(user_key, instance, int(pttl)), won=bool(won))

    # -- PinStore --

    async def get(self, user_key: str) -> Pin | None:
        instance, pttl = await self._call("get", lambda: self._script("GET", [self._pin_key(user_key)], []))
        if instance is None or pttl == -2:
            return None
        return self._pin(user_key, instance, int(pttl))

    async def claim(self, user_key: str, instance: InstanceId) -> ClaimResult:
        return await self._mutate("claim", user_key, [user_key, instance, self._ttl_ms])

    async def repin(self, user_key: str, expected: InstanceId | None, instance: InstanceId) -> ClaimResult:
        """Compare-and-set. A pin that is already gone (expired, dropped, reaped) counts as matching
        any ``expected``: the caller wanted it replaced, and ``ClaimResult`` cannot carry "no pin"."""
        return await self._mutate("repin", user_key, [user_key, expected or "", instance, self._ttl_ms])

    async def set(self, user_key: str, instance: InstanceId) -> Pin:
        return (await self._mutate("set", user_key, [user_key, instance, self._ttl_ms])).pin

    async def drop(self, user_key: str, expected: InstanceId | None = None) -> bool:
        instances, idx, _ = self._bucket(bucket_of(user_key))
        keys, args = [self._pin_key(user_key), instances], [idx, user_key, expected or ""]
        return bool(await self._call("drop", lambda: self._script("DROP", keys, args)))

    async def touch(self, user_key: str, instance: InstanceId) -> None:
        """Record the use; no I/O here (ignored once closed). A background flush (``pins.redis_touch``)
        refreshes every pending pin once ``touch_interval`` has passed since the last flush: one
        script call per bucket (and per ``TOUCH_BATCH`` pins), pipelined into one round trip on one
        Redis."""
        self._touches.add(user_key, instance)

    async def _write_touches(self, batch: dict[str, InstanceId]) -> None:
        by_bucket: dict[int, builtins.list[str]] = {}
        for user, instance in batch.items():
            by_bucket.setdefault(bucket_of(user), []).extend((user, instance))
        calls = [
            self._bucket_script("TOUCH", bucket, [self._ttl_ms, *flat[i : i + 2 * TOUCH_BATCH]])
            for bucket, flat in by_bucket.items()
            for i in range(0, len(flat), 2 * TOUCH_BATCH)
        ]
        await self._call("touch", lambda: self._fanout(calls))

    async def flush(self) -> None:
        """Write pending touches now (shutdown). Raises PinStoreUnavailable; the batch is kept."""
        await self._touches.flush()

    async def list(self, instance: InstanceId | None = None, limit: int = 1000) -> builtins.list[Pin]:
        """Live pins from the index, confirmed against the pins themselves. Order: by expiry per
        instance (soonest first), instances in name order."""
        if limit <= 0:
            return []
        if instance is None:
            calls = [
                (lambda client, key=self._bucket(b)[0]: client.smembers(key))  # type: ignore[misc]
                for b in range(BUCKETS)
            ]
            sets = await self._call("list", lambda: self._fanout(calls))
            pins: builtins.list[Pin] = []
            for name in sorted(set().union(*sets)):
                if len(pins) >= limit:
                    break
                pins.extend(await self.list(InstanceId(name), limit - len(pins)))
            return pins
        calls = [self._bucket_script("LIST", b, [instance, limit]) for b in range(BUCKETS)]
        replies = await self._call("list", lambda: self._fanout(calls))
        found = [self._pin(flat[i], instance, int(flat[i + 1])) for flat in replies for i in range(0, len(flat), 2)]
        found.sort(key=lambda pin: (pin.expires_in is not None, pin.expires_in or 0.0))
        return found[:limit]

    async def counts(self) -> dict[InstanceId, int]:
        """Per-instance sums over the buckets (each bucket trims its expired index entries)."""
        calls = [self._bucket_script("COUNTS", b, []) for b in range(BUCKETS)]
        totals: dict[InstanceId, int] = {}
        for flat in await self._call("counts", lambda: self._fanout(calls)):
            for i in range(0, len(flat), 2):
                totals[InstanceId(flat[i])] = totals.get(InstanceId(flat[i]), 0) + int(flat[i + 1])
        return totals

    async def drop_instance(self, instance: InstanceId) -> builtins.list[str]:
        """Batches of ``DROP_BATCH`` index members per bucket, each one atomic script call; all
        buckets go at once, then again only those with entries left."""
        dropped: builtins.list[str] = []
        pending = builtins.list(range(BUCKETS))
        while pending:
            calls = [self._bucket_script("DROP_INSTANCE", b, [instance, DROP_BATCH]) for b in pending]
            replies = await self._call("drop_instance", lambda calls=calls: self._fanout(calls))  # type: ignore[misc]
            left = []
            for bucket, (remaining, users) in zip(pending, replies, strict=True):
                dropped.extend(users)
                if int(remaining) > 0:
                    left.append(bucket)
            pending = left
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
        for helper in self._helpers:
            await helper.aclose()
