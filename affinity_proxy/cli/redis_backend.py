"""RedisBackend: the ``PinBackend`` of the pin, instance and reap commands straight on the Redis
named by ``store.url`` (``redis://``, ``rediss://``, ``unix://``), with no proxy node involved.

Why: with a shared store an operator should not need a running node (or its admin listener) to
look at or change pins. ``cli_base.make_backend`` picks this backend when the config names a Redis
store and ``--admin`` was not given; the memory store is only reachable through a node's admin API.
Every method returns the admin API's JSON shape (``web/admin.py``) so the commands and
``cli_output`` are shared, and raises ``BackendError`` with the admin API's HTTP status where one
applies (400 bad input, 404 unknown pin or instance) so the commands' messages are identical too.

What "known instance" means without a node's membership (one snapshot of Redis, no probing):

- **configured**: the config's ``instances`` ids (in fly mode also ``fly.machine_id``);
- **reported**: an unexpired heartbeat of any node (``RedisSharedState.heartbeats``), judged by
  ``instances_from_heartbeats`` (the most favourable fresh verdict wins; only stale reports: down);
- **drained**: in the shared drain set; **pinned**: has pins (``store.counts()``).

State shown (``instances list``, ``pins show``, drain/undrain answers): the heartbeat verdict
``down``/``stopped``; else ``draining`` when drained (as on the nodes, a drain mark does not hide a
dead instance); else ``up`` when reported (a ``draining`` report without a mark is a node that has
not applied an undrain yet); else ``unknown`` when configured but nobody reports on it (no node
running); else ``gone``. Instances are listed configured first (config order), then the rest by id.

Commands:

- ``pins set USER INSTANCE`` accepts a configured, reported or pinned instance; anything else is
  rejected like the admin API does. It is an operator re-pin, but the CLI has no metrics registry,
  so ``affinity_repins_total{repin_reason="operator"}`` only counts re-pins made through a node.
- ``instances drain|undrain ID`` writes the shared drain set (every node applies it within one
  membership refresh); ID must be configured, reported, pinned or already drained.
- ``reap``: due are the pinned instances that are unknown (not configured, not reported, not
  drained), and those reported ``down`` when ``reaper.grace`` is 0. A heartbeat carries a verdict
  but not since when it holds, so a one-shot CLI cannot time a grace period; down instances with a
  grace are left to the nodes' reapers, which time it themselves. The pass holds the ``reaper``
  lock (same name and ttl as the nodes', so it never overlaps their passes), re-checks what is due
  under it and deletes with ``store.drop_instance`` (atomic per pin: each pin is deleted once). A
  held lock is an operational error (exit 1, "another reaper is running"). ``--dry-run`` lists
  without the lock and deletes nothing.

Redis down or refusing us: ``BackendError("redis at <scheme://host:port> is unavailable (...)")``,
one line, never the URL's credentials. Store calls use ``max(store.timeout, CLI_TIMEOUT)``: the
request-path timeout is meant for a hot path, not an operator's possibly remote shell. The store's
own outage log lines are muted while the backend is open (the command prints the one-line error).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from redis import exceptions as rexc

from affinity_proxy.cli.admin import BackendError
from affinity_proxy.config import Config
from affinity_proxy.membership.heartbeat import instances_from_heartbeats
from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.shared import HeartbeatInfo
from affinity_proxy.pins.reaper import LOCK_NAME, MIN_LOCK_TTL
from affinity_proxy.pins.redis import RedisPinStore, describe_url
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.placement.live import RedisSketch
from affinity_proxy.placement.rebalancer import outcome_doc, rebalancer_for
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView, is_valid_instance_id
from affinity_proxy.routing.userkey import MAX_USER_KEY_LENGTH

CLI_TIMEOUT = 5.0  # seconds per Redis call at least (connect, read)
MAX_LIST = 100_000
_MUTED_LOGGERS = ("affinity_proxy.pins.redis", "affinity_proxy.membership.redis_shared")


@dataclass(frozen=True, slots=True)
class Configured:
    """One instance from the config: what the CLI knows without any node."""

    id: str
    url: str
    weight: int


def configured_instances(config: Config) -> dict[str, Configured]:
    """``instances`` in config order; in fly mode also this config's ``fly.machine_id``."""
    out = {i.id: Configured(i.id, i.url.rstrip("/"), i.weight) for i in config.instances}
    machine = config.fly.machine_id
    if config.mode == "fly" and machine and machine not in out:
        out = {machine: Configured(machine, "", 1), **out}
    return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What Redis says about instances at one moment, plus the config. Pure methods."""

    configured: Mapping[str, Configured]
    reports: Mapping[InstanceId, list[HeartbeatInfo]]
    verdicts: Mapping[str, Instance]
    drained: frozenset[str]
    counts: Mapping[str, int]

    @classmethod
    def build(cls, configured: Mapping[str, Configured], reports: Mapping[InstanceId, list[HeartbeatInfo]],
              drained: set[InstanceId], counts: Mapping[InstanceId, int], now: float) -> Snapshot:
        verdicts: dict[str, Instance] = {str(i.id): i for i in instances_from_heartbeats(reports, now)}
        return cls(configured, reports, verdicts, frozenset(drained), {k: n for k, n in counts.items() if n > 0})

    def state(self, instance: str) -> str:
        verdict = self.verdicts.get(instance)
        if verdict is not None and verdict.state in (InstanceState.DOWN, InstanceState.STOPPED):
            return verdict.state.value
        if instance in self.drained:
            return InstanceState.DRAINING.value
        if verdict is not None:
            return InstanceState.UP.value
        return "unknown" if instance in self.configured else InstanceState.GONE.value

    def pinnable(self, instance: str) -> bool:
        """``pins set`` accepts it: configured, reported or pinned."""
        return instance in self.configured or instance in self.verdicts or instance in self.counts

    def known(self, instance: str) -> bool:
        """Drain and undrain accept it: pinnable or already drained."""
        return self.pinnable(instance) or instance in self.drained

    def ids(self) -> list[str]:
        rest = (set(self.verdicts) | self.drained | set(self.counts)) - set(self.configured)
        return [*self.configured, *sorted(rest)]

    def due(self, grace: float) -> list[str]:
        """Pinned instances the CLI may reap: unknown, or reported down when ``grace`` is 0."""
        out = []
        for instance in sorted(self.counts):
            unknown = instance not in self.configured and instance not in self.verdicts and instance not in self.drained
            verdict = self.verdicts.get(instance)
            down = verdict is not None and verdict.state is InstanceState.DOWN and grace <= 0
            if unknown or down:
                out.append(instance)
        return out

    def instance_doc(self, instance: str, now: float) -> dict[str, Any]:
        conf = self.configured.get(instance)
        verdict = self.verdicts.get(instance)
        return {
            "id": instance,
            "url": conf.url if conf is not None and conf.url else (verdict.url if verdict is not None else ""),
            "state": self.state(instance),
            "weight": conf.weight if conf is not None else 1,
            "pins": self.counts.get(instance, 0),
            "local": False,  # the CLI is no node: it probes nothing itself
            "region": (verdict.region or None) if verdict is not None else None,
            "reports": [{"node": r.node, "state": r.state, "age_seconds": round(max(0.0, now - r.seen_at), 3)}
                        for r in self.reports.get(InstanceId(instance), [])],
        }


def _check_user(user: str) -> None:
    if not user or len(user) > MAX_USER_KEY_LENGTH or not user.isprintable():
        raise BackendError(f"user key: 1 to {MAX_USER_KEY_LENGTH} printable characters", 400, "bad_user")


def _short_reason(exc: BaseException) -> str:
    """A short cause: the errno text of an OS error in the chain (``Connection refused``), else the
    message of the first exception (redis-py's text names host and port, never credentials)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno and seen.errno > 0:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return " ".join((str(exc) or type(exc).__name__).split()).rstrip(".")


def _scrub(text: str, url: str) -> str:
    """Remove the URL's password and user name from ``text`` (belt and braces: redis-py's messages
    name host and port only)."""
    parts = urlsplit(url)
    for secret in (parts.password, parts.username):
        if secret:
            for form in {secret, unquote(secret)}:
                text = text.replace(form, "***")
    return text


@contextmanager
def _muted(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before, strict=True):
            lg.disabled = was


class RedisBackend:
    """``PinBackend`` on the config's Redis (see the module docstring for the rules). Use as an
    async context manager; opening does no I/O (the first call connects)."""

    def __init__(self, config: Config, *, timeout: float | None = None, clock: Callable[[], float] = time.time) -> None:
        if config.store.kind != "redis":
            raise ValueError("RedisBackend needs a redis://, rediss://, unix://, redis+cluster:// or "
                             "redis+sentinel:// store.url")
        self.config = config
        self.url = config.store.url
        self.where = describe_url(self.url)
        self._timeout = timeout if timeout is not None else max(config.store.timeout, CLI_TIMEOUT)
        self._clock = clock
        self._configured = configured_instances(config)
        self._store: RedisPinStore | None = None
        self._shared: RedisSharedState | None = None
        self._mute = _muted(_MUTED_LOGGERS)

    async def __aenter__(self) -> RedisBackend:
        self._mute.__enter__()
        store = self.config.store
        try:
            self._store = RedisPinStore(self.url, key_prefix=store.key_prefix, pin_ttl=self.config.pin_ttl,
                                        timeout=self._timeout, max_connections=4)
            self._shared = RedisSharedState(self._store)
        except BaseException:
            self._mute.__exit__(None, None, None)
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if self._store is not None:
                await self._store.close()
        finally:
            self._store = self._shared = None
            self._mute.__exit__(None, None, None)

    # -- plumbing --

    @property
    def store(self) -> RedisPinStore:
        assert self._store is not None, "use RedisBackend as an async context manager"
        return self._store

    @property
    def shared(self) -> RedisSharedState:
        assert self._shared is not None, "use RedisBackend as an async context manager"
        return self._shared

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Redis outages and refusals -> one-line ``BackendError`` without credentials."""
        try:
            yield
        except PinStoreUnavailable as exc:
            reason = _scrub(_short_reason(exc.__cause__ or exc), self.url)
            raise BackendError(f"redis at {self.where} is unavailable ({reason})") from None
        except rexc.RedisError as exc:  # answered, but refused (NOPERM, wrong type, ...)
            reason = _scrub(_short_reason(exc), self.url)
            raise BackendError(f"redis at {self.where} refused the request ({reason})") from None

    async def snapshot(self) -> Snapshot:
        """Heartbeats, drain marks and pin counts (three round trips) judged at the current time."""
        with self._errors():
            reports = await self.shared.heartbeats()
            drained = await self.shared.drained()
            counts = await self.store.counts()
        return Snapshot.build(self._configured, reports, drained, counts, self._clock())

    # -- PinBackend --

    async def list_pins(self, instance: str | None = None, limit: int | None = None) -> dict[str, Any]:
        if instance is not None and not is_valid_instance_id(instance):
            raise BackendError("instance: not a valid instance id", 400, "bad_instance")
        with self._errors():
            pins = await self.store.list(InstanceId(instance) if instance else None,
                                         limit=min(limit if limit is not None else 1000, MAX_LIST))
        return {"pins": [{"user": p.user_key, "instance": p.instance, "expires_in": p.expires_in} for p in pins]}

    async def show_pin(self, user: str) -> dict[str, Any]:
        _check_user(user)
        with self._errors():
            pin = await self.store.get(user)
        if pin is None:
            raise BackendError("no pin for this user", 404, "no_pin")
        snap = await self.snapshot()
        return {"user": pin.user_key, "instance": pin.instance, "expires_in": pin.expires_in,
                "state": snap.state(pin.instance)}

    async def set_pin(self, user: str, instance: str) -> dict[str, Any]:
        _check_user(user)
        if not is_valid_instance_id(instance) or not (await self.snapshot()).pinnable(instance):
            raise BackendError("instance: must name a known instance", 400, "unknown_instance")
        with self._errors():
            pin = await self.store.set(user, InstanceId(instance))
        return {"user": pin.user_key, "instance": pin.instance, "expires_in": pin.expires_in}

    async def drop_pin(self, user: str) -> dict[str, Any]:
        _check_user(user)
        with self._errors():
            dropped = await self.store.drop(user)
        if not dropped:
            raise BackendError("no pin for this user", 404, "no_pin")
        return {"dropped": True}

    async def instances(self) -> dict[str, Any]:
        """Each instance with its live sessions: pins plus the anonymous sessions the nodes' sketches
        saw within ``placement.rebalance.idle_after`` (one more round trip)."""
        snap = await self.snapshot()
        now = self._clock()
        with self._errors():
            anonymous = await RedisSketch(self.store, self.config.placement.rebalance.idle_after).counts(
                snap.ids(), now)
        docs = [snap.instance_doc(i, now) for i in snap.ids()]
        for doc in docs:
            doc["sessions"] = doc["pins"] + anonymous.get(doc["id"], 0)
        return {"reports_available": True, "instances": docs}

    async def _set_drain(self, instance: str, drain: bool) -> dict[str, Any]:
        if not is_valid_instance_id(instance) or not (await self.snapshot()).known(instance):
            raise BackendError("unknown instance", 404, "unknown_instance")
        with self._errors():
            await (self.shared.drain if drain else self.shared.undrain)(InstanceId(instance))
        return {"id": instance, "state": (await self.snapshot()).state(instance)}

    async def drain(self, instance: str) -> dict[str, Any]:
        return await self._set_drain(instance, True)

    async def undrain(self, instance: str) -> dict[str, Any]:
        return await self._set_drain(instance, False)

    async def rebalance(self, dry_run: bool = False) -> dict[str, Any]:
        """One rebalance pass (``placement.rebalance``) on the membership the CLI sees (config,
        heartbeats, drain marks), under the nodes' ``rebalance`` lock; anonymous sessions from the
        nodes' sketches."""
        snap = await self.snapshot()
        # A configured instance no node reports on ("unknown") is taken as up, as the nodes start it.
        view = MembershipView.build(
            Instance(InstanceId(i), weight=doc["weight"],
                     state=InstanceState.UP if doc["state"] == "unknown" else InstanceState(doc["state"]))
            for i in snap.ids() for doc in (snap.instance_doc(i, self._clock()),))
        with self._errors():
            anonymous = await RedisSketch(self.store, self.config.placement.rebalance.idle_after).counts(
                snap.ids(), self._clock())
            rebalancer = rebalancer_for(self.config, self.store, lambda: view, anonymous=lambda: anonymous,
                                        lock=self.shared, clock=self._clock)
            outcome = await rebalancer.run_once(dry_run=dry_run)
        return outcome_doc(rebalancer, outcome, dry_run=dry_run)

    @property
    def lock_ttl(self) -> float:
        """The nodes' reaper lock ttl (``Reaper.lock_ttl``)."""
        return max(2 * self.config.reaper.interval, MIN_LOCK_TTL)

    async def reap(self, dry_run: bool = False) -> dict[str, Any]:
        grace = self.config.reaper.grace
        due = (await self.snapshot()).due(grace)
        reaped: dict[str, list[str]] = {}
        if dry_run or not due:
            with self._errors():
                for instance in due:
                    users = sorted(p.user_key for p in await self.store.list(InstanceId(instance), limit=MAX_LIST))
                    if users:
                        reaped[instance] = users
            return self._reap_doc(dry_run, reaped)
        with self._errors():
            token = await self.shared.acquire_lock(LOCK_NAME, self.lock_ttl)
        if token is None:
            raise BackendError(f"another reaper is running (the {LOCK_NAME} lock is held by a node or "
                               "another CLI); nothing was reaped, try again later", 409, "locked")
        try:
            for instance in (await self.snapshot()).due(grace):  # again, under the lock
                with self._errors():
                    users = sorted(await self.store.drop_instance(InstanceId(instance)))
                if users:
                    reaped[instance] = users
        finally:
            try:
                await self.shared.release_lock(LOCK_NAME, token)
            except (PinStoreUnavailable, rexc.RedisError):
                pass  # the lock frees itself after lock_ttl; the pass's own error (if any) is the news
        return self._reap_doc(False, reaped)

    @staticmethod
    def _reap_doc(dry_run: bool, reaped: dict[str, list[str]]) -> dict[str, Any]:
        return {"dry_run": dry_run, "reaped": reaped, "total": sum(len(v) for v in reaped.values())}
