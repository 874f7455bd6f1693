"""The local Fly edge's replay cache: which replay decisions it remembers and for which requests.

No network I/O and no clock of its own (``now`` is passed in). Modelled, with the docs/fly-protocol.md
source of each (§1 "Replay caching", §5 ``[[http_service.http_options.replay_cache]]``, §6 pitfall 6):

- **Session-based** (§5): fly.toml rules (``CacheRule``: ``path_prefix``, ``ttl_seconds`` at least
  10, ``type = "cookie" | "header"``, ``name``). The rule whose prefix is the longest match for the
  request wins; the entry is keyed on the request's host, that rule and the cookie's or header's
  value, so every value (every re-issued cookie) is a key of its own. GUESS (docs silent): a
  request without that cookie or header is neither looked up nor stored; ``path_prefix = "/"``
  means the same as ``"/*"`` (§5 "implicitly ``/*``").
- **Path-based** (§1): a replay answer carrying ``fly-replay-cache: /path/*`` (or
  ``host/path/*``; no port; it must match the current request) and
  ``fly-replay-cache-ttl-secs: N`` is stored for every request of that host matching the pattern.
  GUESS: a TTL under 10 s (§1 "The TTL is at least 10 s") or a missing one means "not stored".
- **Only a cacheable replay is stored** (§1: "A cached replay may not carry ``state``,
  transforms, ``timeout`` or ``fallback``"); only the origin's answer is (the first machine the
  request was load balanced to: "Only one cache lookup step is made"; a replay answered by a
  replay target is followed but never stored, docs: "the caching behavior in this case is
  undefined"). GUESS: a non-cacheable replay is followed as usual and not stored (rather than PA03).
- **Lookup**: once per request, before load balancing (§1 "Only one cache lookup step is made").
  GUESS: a client's ``fly-force-instance-id``/``fly-prefer-instance-id`` skips the lookup.
- **Invalidation** (§1): a response carrying ``fly-replay-cache: invalidate`` deletes the entry
  that sent the request there (else the entry this request would have been looked up under).
- **Expiry**: an entry lives ``ttl`` seconds from when it was stored. GUESS: a hit does not extend it.

A hit's delivery (``fly-replay-cache-status: hit``, no ``fly-replay-src``) and what happens when the
cached target is gone are the edge's (``edge_route.EdgeRouter.cached``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from affinity_proxy.routing.cookie_header import parse_cookie_header
from affinity_proxy.routing.replay import (
    CACHE_INVALIDATE,
    REPLAY_CACHE_HEADER,
    REPLAY_CACHE_TTL_HEADER,
    ReplayInstruction,
)

#: Fly's minimum TTL for a cached replay (docs/fly-protocol.md §1, §5).
MIN_TTL = 10
CacheKey = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CacheRule:
    """One ``[[http_service.http_options.replay_cache]]`` table of fly.toml (docs/fly-protocol.md §5)."""

    name: str
    type: Literal["cookie", "header"] = "cookie"
    path_prefix: str = "/"
    ttl_seconds: int = 60
    allow_bypass: bool = False

    def __post_init__(self) -> None:
        if self.type not in ("cookie", "header"):
            raise ValueError(f"replay_cache type must be cookie or header, got {self.type!r}")
        if not isinstance(self.ttl_seconds, int) or self.ttl_seconds < MIN_TTL:
            raise ValueError(f"replay_cache ttl_seconds must be at least {MIN_TTL}, got {self.ttl_seconds!r}")
        if not self.name:
            raise ValueError("replay_cache name is required")

    @classmethod
    def from_toml(cls, table: Mapping[str, object]) -> CacheRule:
        """A rule from a parsed fly.toml table (``tomllib``); ValueError for what Fly would refuse."""
        return cls(name=str(table["name"]), type=table.get("type", "cookie"),  # type: ignore[arg-type]
                   path_prefix=str(table.get("path_prefix", "/")),
                   ttl_seconds=table.get("ttl_seconds", 60),  # type: ignore[arg-type]
                   allow_bypass=bool(table.get("allow_bypass", False)))


def _pattern_matches(pattern: str, host: str, path: str) -> int | None:
    """The length of ``pattern`` when it matches ``host`` + ``path`` (``/p/*``, ``host/p/*``, ``/``),
    else None. A pattern's host is compared without a port, case-insensitively."""
    body = pattern[:-1] if pattern.endswith("*") else pattern
    if not body.startswith("/"):
        want_host, slash, rest = body.partition("/")
        if want_host.lower() != host or not slash:
            return None
        body = "/" + rest
    return len(pattern) if path.startswith(body) else None


def cacheable(instr: ReplayInstruction) -> bool:
    """A replay Fly may cache: no ``state``, ``timeout`` or ``fallback`` (transforms cannot be
    expressed in the header form the proxy uses)."""
    return instr.state is None and instr.timeout is None and instr.fallback is None


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where a request's entry lives (``key``) and, when there is one, its ``value`` (a hit)."""

    key: CacheKey | None
    value: str | None = None


class ReplayCache:
    """The edge's replay cache (see the module docstring). Counters: ``hits``, ``stores``,
    ``invalidations``, ``refused`` (replays a rule matched but Fly may not cache), ``expired``."""

    def __init__(self, rules: tuple[CacheRule, ...] = ()) -> None:
        self.rules = rules
        self._entries: dict[CacheKey, tuple[str, float]] = {}
        self._paths: dict[tuple[str, str], float] = {}  # (host, pattern) -> expiry, for lookups
        self.counts: Counter[str] = Counter()

    @property
    def active(self) -> bool:
        """The app uses the replay cache at all (rules, or path entries were ever stored)."""
        return bool(self.rules) or bool(self._paths) or self.counts["stores"] > 0

    def _rule_for(self, host: str, path: str) -> CacheRule | None:
        best: tuple[int, CacheRule] | None = None
        for rule in self.rules:
            length = _pattern_matches(rule.path_prefix, host, path)
            if length is not None and (best is None or length > best[0]):
                best = (length, rule)
        return best[1] if best else None

    @staticmethod
    def _session_value(rule: CacheRule, headers: Mapping[str, str]) -> str | None:
        if rule.type == "header":
            return headers.get(rule.name)
        raw = headers.get("Cookie")
        return parse_cookie_header(raw).get(rule.name) if raw else None

    def key_for(self, host: str, path: str, headers: Mapping[str, str], now: float) -> CacheKey | None:
        """The key this request is looked up (and stored) under: the session rule's, else the
        longest live path pattern's; None when the cache does not apply."""
        host = host.rpartition(":")[0] if ":" in host and not host.endswith("]") else host
        host = host.lower()
        rule = self._rule_for(host, path)
        if rule is not None:
            value = self._session_value(rule, headers)
            return ("session", host, rule.path_prefix, rule.type, rule.name, value) if value is not None else None
        best: tuple[int, str] | None = None
        for (h, pattern), until in list(self._paths.items()):
            if until <= now:
                del self._paths[(h, pattern)]
                continue
            length = _pattern_matches(pattern, host, path) if h == host else None
            if length is not None and (best is None or length > best[0]):
                best = (length, pattern)
        return ("path", host, best[1]) if best else None

    def lookup(self, host: str, path: str, headers: Mapping[str, str], now: float) -> Lookup:
        key = self.key_for(host, path, headers, now)
        if key is None:
            return Lookup(None)
        found = self._entries.get(key)
        if found is None:
            return Lookup(key)
        value, until = found
        if until <= now:
            del self._entries[key]
            self.counts["expired"] += 1
            return Lookup(key)
        self.counts["hits"] += 1
        return Lookup(key, value)

    def store(self, lookup: Lookup, host: str, path: str, value: str, instr: ReplayInstruction,
              response_headers: Mapping[str, str], now: float) -> bool:
        """Remember the origin's replay ``value`` (its answer's headers ``response_headers``) when
        a rule or the answer's ``fly-replay-cache`` pattern applies and the replay is cacheable."""
        host = host.rpartition(":")[0] if ":" in host and not host.endswith("]") else host
        host = host.lower()
        pattern = response_headers.get(REPLAY_CACHE_HEADER, "").strip()
        key: CacheKey | None = None
        ttl: float | None = None
        if pattern and pattern != CACHE_INVALIDATE:
            try:
                ttl = int(response_headers.get(REPLAY_CACHE_TTL_HEADER, ""))
            except ValueError:
                ttl = None
            if ttl is None or ttl < MIN_TTL or _pattern_matches(pattern, host, path) is None:
                self.counts["refused"] += 1
                return False
            key = ("path", host, pattern)
        elif lookup.key is not None and lookup.key[0] == "session":
            rule = self._rule_for(host, path)
            ttl = rule.ttl_seconds if rule is not None else None
            key = lookup.key
        if key is None or ttl is None:
            return False
        if not cacheable(instr):
            self.counts["refused"] += 1
            return False
        self._entries[key] = (value, now + ttl)
        if key[0] == "path":
            self._paths[(host, key[2])] = now + ttl
        self.counts["stores"] += 1
        return True

    def invalidate(self, key: CacheKey | None) -> bool:
        """Drop the entry under ``key`` (``fly-replay-cache: invalidate``)."""
        self.counts["invalidations"] += 1
        if key is None or self._entries.pop(key, None) is None:
            return False
        if key[0] == "path":
            self._paths.pop((key[1], key[2]), None)
        return True

    def evict(self, key: CacheKey) -> None:
        """Drop an entry whose target is gone (the ``evict`` reading of ``gone_target``)."""
        self._entries.pop(key, None)
        self.counts["evicted"] += 1

    def __len__(self) -> int:
        return len(self._entries)


def wants_invalidate(response_headers: Mapping[str, str]) -> bool:
    return response_headers.get(REPLAY_CACHE_HEADER, "").strip().lower() == CACHE_INVALIDATE
