"""RedisPinStore: the pin store shared by every worker and node: one Redis (``redis://``, ``rediss://``,
``unix://``), Redis Cluster (``redis+cluster://``) or a Sentinel-managed primary (``redis+sentinel://``).

Key schema (``P`` = ``key_prefix``, default ``affinity:``). Pins are spread over ``BUCKETS`` buckets
(``N`` = crc32(user key) mod ``BUCKETS``); every key of a bucket carries the hash tag ``{pN}``, so one
bucket lives in one Redis Cluster slot and every script touches one slot:

- ``P pin:{pN}<user_key>``  string, the instance id; expires (PXAT) at the pin's sliding expiry rounded
  down to a grid of ``window`` = pin_ttl / ``WINDOWS`` (so a pin lives between 31/32 and all of
  ``pin_ttl`` after its last use).
- ``P cnt:{pN}<instance>``  hash, field = an expiry on that grid (server unix ms), value = how many of
  the bucket's pins of that instance expire then. At most ``WINDOWS`` + 1 fields: a small listpack.
- ``P live{pN}``            set of instance ids that may have a counter in bucket N.

Why counters and not an index entry per pin: a plain ``SET ... PX`` key is all a pin costs
(measured in benchmarks/SCALING.md); the sorted-set index it replaced (``pins.redis_legacy``) more than
doubled that. Every pin of a counter field expires exactly at the field's time, so ``counts()`` stays
exact (it sums the fields not yet past, each bucket trimming its past ones) and costs
O(buckets x instances x windows), whatever the number of pins. ``list()`` and ``drop_instance()``
(admin and reaper calls, rare) find pins by an incremental ``SCAN`` of the pin keys: ``SCAN_COUNT``
keys per step, one step at a time with ``SCAN_PAUSE`` between steps, never a blocking walk.
Exactness of the reaper: SCAN returns every key that exists for the whole walk, so ``drop_instance``
deletes every pin of the instance written before it started; the reaper repeats while counts say
pins are left.

Previous layout (sorted-set index ``P idx:{pN}<instance>`` + ``P instances{pN}``; ``pins.redis_legacy``):
the pin keys are the same, so pins written by either layout are read by both, and old and new nodes
can serve one Redis during a rolling deploy. This store counts a legacy pin from its index entry
until it next writes, touches or drops the pin, which moves it to the counters (so the legacy index
empties itself within one ``pin_ttl``); ``counts()`` adds the legacy indexes. While old nodes run,
``counts()`` may over-count the pins both kinds of node touched, until their older expiry passes.

Shared membership state lives under the same prefix, all in the one slot of the tag ``{m}`` (schema
in ``membership.redis_shared``). The same layout is used on every kind of Redis, so a store can move
from one Redis to a cluster by copying keys.

Why buckets: a counter must change in the same script as the pin, so it must live in the pin's slot.
A fixed number of buckets keeps whole-store reads (``counts()``) at ``BUCKETS`` small script calls
(pipelined into one round trip on one Redis; on a cluster, ``FANOUT`` at a time), while 128 slots
spread the pins over the masters of a cluster evenly enough (each of 3 masters holds about a third).
Every mutation that touches a pin and a counter is one Lua script (``pins.redis_scripts``).
``touch`` is batched: it only records the pin in memory, and a single background flush per
``touch_interval`` refreshes the whole batch (one script call per bucket); a refresh writes only
when the pin's expiry moves to a later grid line.

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
import contextlib
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
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
WINDOWS = 32  # expiry grid lines per pin_ttl: counter fields per bucket and instance (see the module doc)
SCAN_COUNT = 1000  # keys one SCAN step visits: bounds the work of one step in Redis
SCAN_PAUSE = 0.002  # seconds between SCAN steps: bounds the rate of a walk over the keyspace
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


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


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
    ``set``, ``drop``); ``counts()`` visits every bucket, ``list()`` and ``drop_instance()`` walk the
    pin keys by SCAN (see the module doc). ``touch`` costs no I/O at the call site.

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
        self._window_ms = max(1, self._ttl_ms // WINDOWS)
        self.scan_pause = SCAN_PAUSE
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

    def _bucket(self, bucket: int) -> tuple[builtins.list[str], builtins.list[str]]:
        """Keys (counted-instances set, legacy instances set) and bases (counter, legacy index, pin)
        of a bucket: all in the slot of its hash tag."""
        tag = f"{{p{bucket}}}"
        p = self.prefix
        return [f"{p}live{tag}", f"{p}instances{tag}"], [f"{p}cnt:{tag}", f"{p}idx:{tag}", f"{p}pin:{tag}"]

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
        keys, bases = self._bucket(bucket)
        args = [*bases, *extra]
        return lambda client: self._scripts[name](keys=keys, args=args, client=client)

    def _script(self, name: str, keys: builtins.list[str], args: builtins.list[Any]) -> Awaitable[Any]:
        return self._scripts[name](keys=keys, args=args)

    def _pin(self, user_key: str, instance: str, pttl: int) -> Pin:
        return Pin(user_key, InstanceId(instance), pttl / 1000 if pttl >= 0 else None)

    def _user_call(self, user_key: str) -> tuple[builtins.list[str], builtins.list[Any]]:
        """KEYS (pin, counted-instances set) and the ARGV head (counter base, legacy index base,
        user) of a per-user script."""
        (live, _), (cnt, idx, _) = self._bucket(bucket_of(user_key))
        return [self._pin_key(user_key), live], [cnt, idx, user_key]

    async def _mutate(self, op: str, user_key: str, args: builtins.list[Any]) -> ClaimResult:
        keys, head = self._user_call(user_key)
        args = [*head, *args, self._ttl_ms, self._window_ms]
        won, instance, pttl = await self._call(op, lambda: self._script(op.upper(), keys, args))
        return ClaimResult(self._pin(user_key, instance, int(pttl)), won=bool(won))

    async def _scan(self, op: str) -> AsyncIterator[dict[int, builtins.list[str]]]:
        """The user keys of every pin, one SCAN step (``SCAN_COUNT`` keys) at a time, grouped by
        bucket; on a cluster, every primary in turn. Each step is one call through the breaker."""
        pattern = f"{_glob_escape(self.prefix)}pin:{{p*"
        start = len(self.prefix) + len("pin:{p")
        if self.cluster:
            await self._call(op, self._client.initialize)
            targets: builtins.list[Any] = builtins.list(self._client.get_primaries())
        else:
            targets = [None]
        for node in targets:
            cursor = 0
            while True:
                cursor, keys = await self._call(op, lambda c=cursor, n=node: self._scan_step(n, c, pattern))  # type: ignore[misc]
                found: dict[int, builtins.list[str]] = {}
                for key in keys:
                    close = key.find("}", start)
                    tag = key[start:close]
                    if close > 0 and tag.isdigit():  # else not a pin key of ours (matched the pattern only)
                        found.setdefault(int(tag), []).append(key[close + 1 :])
                if found:
                    yield found
                if cursor == 0:
                    break
                await asyncio.sleep(self.scan_pause)

    async def _scan_step(self, node: Any, cursor: int, pattern: str) -> tuple[int, builtins.list[str]]:
        if node is None:
            next_cursor, keys = await self._client.scan(cursor, match=pattern, count=SCAN_COUNT)
            return int(next_cursor), keys
        cursors, keys = await self._client.scan(cursor, match=pattern, count=SCAN_COUNT, target_nodes=node)
        return int(cursors[node.name]), keys

    # -- PinStore --

    async def get(self, user_key: str) -> Pin | None:
        instance, pttl = await self._call("get", lambda: self._script("GET", [self._pin_key(user_key)], []))
        if instance is None or pttl == -2:
            return None
        return self._pin(user_key, instance, int(pttl))

    async def claim(self, user_key: str, instance: InstanceId) -> ClaimResult:
        return await self._mutate("claim", user_key, [instance])

    async def repin(self, user_key: str, expected: InstanceId | None, instance: InstanceId) -> ClaimResult:
        """Compare-and-set. A pin that is already gone (expired, dropped, reaped) counts as matching
        any ``expected``: the caller wanted it replaced, and ``ClaimResult`` cannot carry "no pin"."""
        return await self._mutate("repin", user_key, [expected or "", instance])

    async def set(self, user_key: str, instance: InstanceId) -> Pin:
        return (await self._mutate("set", user_key, [instance])).pin

    async def drop(self, user_key: str, expected: InstanceId | None = None) -> bool:
        keys, head = self._user_call(user_key)
        args = [*head, expected or ""]
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
            self._bucket_script("TOUCH", bucket, [self._ttl_ms, self._window_ms, *flat[i : i + 2 * TOUCH_BATCH]])
            for bucket, flat in by_bucket.items()
            for i in range(0, len(flat), 2 * TOUCH_BATCH)
        ]
        await self._call("touch", lambda: self._fanout(calls))

    async def flush(self) -> None:
        """Write pending touches now (shutdown). Raises PinStoreUnavailable; the batch is kept."""
        await self._touches.flush()

    async def list(self, instance: InstanceId | None = None, limit: int = 1000) -> builtins.list[Pin]:
        """Live pins (of ``instance``, or all), found by an incremental SCAN that stops once ``limit``
        are found: with more than ``limit`` pins, which ones come back is SCAN's order. Sorted by
        instance name, then expiry (soonest first)."""
        if limit <= 0:
            return []
        found: builtins.list[Pin] = []
        async with contextlib.aclosing(self._scan("list")) as batches:
            async for batch in batches:
                calls = [self._bucket_script("LIST_KEYS", b, [instance or "", *users]) for b, users in batch.items()]
                for flat in await self._call("list", lambda calls=calls: self._fanout(calls)):  # type: ignore[misc]
                    found.extend(self._pin(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3))
                if len(found) >= limit:
                    break
        found.sort(key=lambda pin: (pin.instance, pin.expires_in is not None, pin.expires_in or 0.0))
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
        """One incremental SCAN over the pin keys; each step's keys are checked and deleted by one
        atomic script call per bucket (so racing reapers report each pin once). Deletes every pin of
        ``instance`` that existed when the walk started; one written during the walk may be left
        for the next pass (``counts()`` still shows it)."""
        dropped: builtins.list[str] = []
        async for batch in self._scan("drop_instance"):
            calls = [self._bucket_script("DROP_KEYS", b, [instance, *users]) for b, users in batch.items()]
            for users in await self._call("drop_instance", lambda calls=calls: self._fanout(calls)):  # type: ignore[misc]
                dropped.extend(users)
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
