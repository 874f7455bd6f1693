"""The configuration tree: frozen, slotted dataclasses that validate themselves.

Every class builds directly in code with defaults (``Config()``, ``CookieConfig(secret="s")``), and
``__post_init__`` checks types and ranges, raising ``ConfigError`` with the key path from the root
of the YAML file ("cookie.same_site: must be one of Strict, Lax, None"). List items use their list
name as prefix (``instances.url``); the loader rewrites it to ``instances[1].url``. Requirements
that only matter for running (instances in proxy mode, a machine id in fly mode, a cookie secret)
are ``Config.require_*`` methods, so partial configs can be built in code and tests.
Secrets carry ``metadata={"secret": True}`` and ``repr=False``; ``Config.redacted()`` masks them.
No I/O and no environment reads; imports only the stdlib, ``config_*`` helpers and ``routing.model``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import urlsplit

from affinity_proxy.config.check import TOKEN, Check, http_url_problem
from affinity_proxy.config.parse import HOSTNAME, ConfigError, parse_hostport, redact_url
from affinity_proxy.pins.redis_url import DISTRIBUTED_SCHEMES, parse_distributed_url
from affinity_proxy.routing.model import INSTANCE_ID_PATTERN

SECRET: dict[str, Any] = {"secret": True}
_TOKEN_WHAT = "a token (letters, digits and !#$%&'*+-.^_`|~)"
_ID_WHAT = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """One backend in the static instance list (``instances[]``)."""

    PATH: ClassVar[str] = "instances"
    id: str
    url: str
    weight: int = 1

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.text("id", pattern=INSTANCE_ID_PATTERN, what=_ID_WHAT)
        check.http_url("url")
        check.integer("weight", 1, 1000)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener. ``token``: bearer token required on every admin request when set.
    ``allowed_hosts``: host names (besides IP literals and ``localhost``) the admin listener answers
    to in the ``Host`` header; any other name gets 421, which defeats DNS rebinding. Stored lower-case
    without a trailing dot."""

    PATH: ClassVar[str] = "admin"
    token: str | None = field(default=None, repr=False, metadata=SECRET)
    public_metrics: bool = False  # /metrics and /health answer without the token (for a scraper)
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.text("token", optional=True)
        check.flag("public_metrics")
        names = []
        for i, name in enumerate(check.texts("allowed_hosts")):
            if not HOSTNAME.fullmatch(name):
                raise ConfigError(f"admin.allowed_hosts[{i}]",
                                  f"must be a DNS name like admin.example.com, got {name!r}")
            names.append(name.lower().rstrip("."))
        object.__setattr__(self, "allowed_hosts", tuple(names))


@dataclass(frozen=True, slots=True)
class CookieConfig:
    """The affinity cookie. ``secret`` signs it (HMAC-SHA256); ``previous_secrets`` still verify
    (key rotation). ``max_age`` is whole seconds; ``revalidate_after`` is how long a cookie is
    trusted without a pin-store check. ``same_site: None`` needs ``secure: true`` in browsers."""

    PATH: ClassVar[str] = "cookie"
    name: str = "fly-instance-id"
    secret: str | None = field(default=None, repr=False, metadata=SECRET)
    previous_secrets: tuple[str, ...] = field(default=(), repr=False, metadata=SECRET)
    signed: bool = True
    max_age: int = field(default=604800, metadata={"kind": "whole_seconds"})
    revalidate_after: float = 60.0
    secure: bool = False
    http_only: bool = True
    same_site: str = "Lax"
    path: str = "/"
    domain: str | None = None

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.text("name", pattern=TOKEN, what=_TOKEN_WHAT)
        check.text("secret", optional=True)
        check.texts("previous_secrets")
        check.flag("signed", "secure", "http_only")
        check.integer("max_age", 1)
        check.seconds("revalidate_after", positive=False)
        if check.choice("same_site", ("Strict", "Lax", "None")) == "None" and self.secure is not True:
            raise check.fail("same_site", "None needs secure: true (browsers drop a SameSite=None cookie that "
                                          "is not Secure, and then no request has affinity)")
        check.url_path("path")
        check.hostname("domain", optional=True)


@dataclass(frozen=True, slots=True)
class UserKeySourceConfig:
    """Where a user key may come from: ``kind`` is header, query or cookie; ``name`` names it."""

    PATH: ClassVar[str] = "user_key"
    KINDS: ClassVar[tuple[str, ...]] = ("header", "query", "cookie")
    kind: str
    name: str

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        kind = check.choice("kind", self.KINDS)
        if kind == "query":
            check.text("name")
        else:
            check.text("name", pattern=TOKEN, what=f"a {kind} name, i.e. {_TOKEN_WHAT}")


@dataclass(frozen=True, slots=True)
class SessionCheckConfig:
    """``/_affinity/session-check`` on the main listener. ``lookup``: who may explain another user's
    routing (``?userId=`` or a body ``userId`` other than the key the request itself carries):
    ``admin`` (only the admin listener's ``/session-check``; the public answer then also omits pin
    expiry and pin counts, which tell when a user was last active) or ``public`` (anyone)."""

    PATH: ClassVar[str] = "session_check"
    LOOKUPS: ClassVar[tuple[str, ...]] = ("admin", "public")
    lookup: str = "admin"

    def __post_init__(self) -> None:
        Check(self, self.PATH).choice("lookup", self.LOOKUPS)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The pin store: ``memory://`` (one process), ``redis://``/``rediss://`` host or ``unix://``
    socket, ``redis+cluster://`` (Redis Cluster seeds) or ``redis+sentinel://`` (Sentinels and the
    master name). ``timeout`` bounds every store call; on timeout the request falls back to the ring."""

    PATH: ClassVar[str] = "store"
    SCHEMES: ClassVar[tuple[str, ...]] = ("memory", "redis", "rediss", "unix", "redis+cluster", "redis+sentinel")
    url: str = field(default="memory://", metadata={"redact": "url"})
    key_prefix: str = "affinity:"
    timeout: float = 0.25

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        url = check.text("url")
        assert url is not None
        problem = _store_url_problem(url)
        if problem:
            raise check.fail("url", f"{problem}, got {redact_url(url)!r}")
        if not isinstance(self.key_prefix, str) or re.search(r"[\s\x00-\x1f]", self.key_prefix):
            raise check.fail(
                "key_prefix", f"expected a string without spaces, {check.got('key_prefix', self.key_prefix)}"
            )
        object.__setattr__(self, "key_prefix", str(self.key_prefix))
        check.seconds("timeout")

    def __repr__(self) -> str:
        return f"StoreConfig(url={redact_url(self.url)!r}, key_prefix={self.key_prefix!r}, timeout={self.timeout!r})"

    @property
    def kind(self) -> str:
        """``memory`` or ``redis`` (rediss and unix sockets are Redis too)."""
        return "memory" if self.url.startswith("memory:") else "redis"


def _store_url_problem(url: str) -> str | None:
    if url.startswith(DISTRIBUTED_SCHEMES):
        try:
            parse_distributed_url(url)
        except ValueError as err:
            return str(err)
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        return f"is not a valid URL ({err})"
    if parts.scheme not in StoreConfig.SCHEMES:
        return f"scheme must be one of {', '.join(StoreConfig.SCHEMES)}"
    if parts.scheme == "memory" and url != "memory://":
        return "the memory store takes no options: use memory://"
    if parts.scheme in ("redis", "rediss") and not parts.hostname:
        return "must name a host, like redis://127.0.0.1:6379/0"
    if parts.scheme in ("redis", "rediss") and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return "the path must be a database number, like redis://host:6379/0"
    if parts.scheme == "unix" and not parts.path:
        return "must name a socket path, like unix:///run/redis.sock"
    return None


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active health checks of local instances: ``GET path`` every ``interval``; an instance is
    ``down`` after ``unhealthy_after`` failures in a row and ``up`` after ``healthy_after`` passes."""

    PATH: ClassVar[str] = "health"
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_after: int = 2
    healthy_after: int = 2

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.url_path("path")
        check.seconds("interval")
        check.seconds("timeout")
        check.integer("unhealthy_after", 1, 100)
        check.integer("healthy_after", 1, 100)


@dataclass(frozen=True, slots=True)
class ReaperConfig:
    """Every ``interval``, drop pins whose instance has been down or gone for longer than ``grace``."""

    PATH: ClassVar[str] = "reaper"
    interval: float = 30.0
    grace: float = 60.0

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.seconds("interval")
        check.seconds("grace", positive=False)


@dataclass(frozen=True, slots=True)
class RebalanceConfig:
    """``placement.rebalance``: a leader-only loop moves pins idle for ``idle_after`` off instances over
    their share, at most ``max_moves_per_minute``; ``idle_after`` is also the window in which an
    anonymous cookie session counts as live (README "Placement")."""

    PATH: ClassVar[str] = "placement.rebalance"
    enabled: bool = False
    idle_after: float = 600.0
    max_moves_per_minute: int = 600

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.flag("enabled")
        check.seconds("idle_after")
        check.integer("max_moves_per_minute", 1, 1_000_000)


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """``placement``: new pins skip instances whose live sessions exceed ``load_factor`` x the mean
    (consistent hashing with bounded loads); ``load_factor`` 0 or null places by the plain ring."""

    PATH: ClassVar[str] = "placement"
    MAX_LOAD_FACTOR: ClassVar[float] = 100.0
    load_factor: float | None = field(default=1.25, metadata={"kind": "number?"})
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig, metadata={"kind": "section"})

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        if not isinstance(self.rebalance, RebalanceConfig):
            raise check.fail("rebalance", "expected a mapping like {enabled: true, idle_after: 10m}")
        value = self.load_factor
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            got = check.got("load_factor", value)
            raise check.fail("load_factor", f"expected a number >= 1 (0 or null: off), {got}")
        if value == 0:
            object.__setattr__(self, "load_factor", None)
        elif not 1 <= value <= self.MAX_LOAD_FACTOR:
            raise check.fail("load_factor", f"must be 0 (off) or between 1 and {self.MAX_LOAD_FACTOR:g}, "
                             f"{check.got('load_factor', value)}")
        else:
            object.__setattr__(self, "load_factor", float(value))


@dataclass(frozen=True, slots=True)
class ReplayCacheConfig:
    """``fly.replay_cache``: work with Fly's replay cache (docs/fly-protocol.md "Replay caching").
    ``enabled``: replays are answered in the cacheable form and cache hits for users who belong
    elsewhere are invalidated. ``ttl``: the ``ttl_seconds`` of the fly.toml
    ``[[http_service.http_options.replay_cache]]`` rule (Fly's minimum is 10 s); keep them equal."""

    PATH: ClassVar[str] = "fly.replay_cache"
    MIN_TTL: ClassVar[float] = 10.0
    enabled: bool = False
    ttl: float = field(default=60.0, metadata={"kind": "whole_seconds"})

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.flag("enabled")
        check.seconds("ttl")
        if self.ttl < self.MIN_TTL:
            raise check.fail("ttl", f"must be at least {self.MIN_TTL:g}s (Fly's minimum), got {self.ttl!r}")


@dataclass(frozen=True, slots=True)
class FlyConfig:
    """Fly.io mode: this node's machine, how peers are discovered and how replays look."""

    PATH: ClassVar[str] = "fly"
    DISCOVERY: ClassVar[tuple[str, ...]] = ("api", "dns", "redis", "static")
    PLACEHOLDERS: ClassVar[Mapping[str, str]] = MappingProxyType({"id": "m1", "app": "a", "port": "1", "region": "ams"})
    app: str | None = None
    machine_id: str | None = None
    region: str | None = None
    upstream: str = "http://127.0.0.1:3000"
    discovery: str = "static"
    discovery_interval: float = 5.0
    replay_status: int = 409
    private_url: str = "http://{id}.vm.{app}.internal:{port}"
    private_port: int = 8080
    dns_server: str = "fdaa::3"
    prefer_instance: bool = False
    #: ``timeout``/``fallback`` fields of every replay (null: left out). Defaults so a destroyed
    #: target comes back here (``fly-replay-failed``) instead of ending in Fly's PR02.
    replay_timeout: float | None = 10.0
    replay_fallback: str | None = "prefer_self"
    #: ``local``: a new session stays on the Machine Fly's edge chose; ``hash``: the ring decides.
    placement: str = "local"
    #: Only Machines of this process group are members (filled from FLY_PROCESS_GROUP; null: all).
    process_group: str | None = None
    api_url: str | None = None
    api_token: str | None = field(default=None, repr=False, metadata=SECRET)
    #: Longest wait for a stopped Machine a private-network forward must reach: started through the
    #: Machines API (``api_url``, ``api_token``), until its ``.internal`` name resolves and it listens.
    wake_timeout: float = 15.0
    replay_cache: ReplayCacheConfig = field(default_factory=ReplayCacheConfig, metadata={"kind": "section"})

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        if not isinstance(self.replay_cache, ReplayCacheConfig):
            raise check.fail("replay_cache", "expected a mapping like {enabled: true, ttl: 60s}")
        label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        check.text("app", optional=True, pattern=re.compile(label), what="a Fly app name (letters, digits, '-')")
        check.text("machine_id", optional=True, pattern=INSTANCE_ID_PATTERN, what=_ID_WHAT)
        check.text("region", optional=True, pattern=re.compile(label), what="a region code like ams")
        check.http_url("upstream")
        check.choice("discovery", self.DISCOVERY)
        check.seconds("discovery_interval")
        check.integer("replay_status", 200, 599)
        self._check_private_url(check)
        check.integer("private_port", 1, 65535)
        self._check_dns_server(check)
        check.flag("prefer_instance")
        check.seconds("replay_timeout", optional=True)
        if self.replay_fallback is not None:
            check.choice("replay_fallback", ("prefer_self", "force_self"))
        check.choice("placement", ("local", "hash"))
        check.text("process_group", optional=True, pattern=re.compile(label), what="a process group name like web")
        check.http_url("api_url", optional=True, allow_path=True)
        check.text("api_token", optional=True)
        check.seconds("wake_timeout")

    def _check_private_url(self, check: Check) -> None:
        template = check.text("private_url")
        assert template is not None
        if "{id}" not in template:
            raise check.fail("private_url", f"must contain {{id}}, got {template!r}")
        try:
            example = template.format(**self.PLACEHOLDERS)
        except (KeyError, IndexError, ValueError) as err:
            raise check.fail(
                "private_url", f"may only use the placeholders {{id}}, {{app}}, {{port}} and {{region}} ({err!r})"
            ) from None
        problem = http_url_problem(example)
        if problem:
            raise check.fail("private_url", f"{problem}, got {template!r}")

    def _check_dns_server(self, check: Check) -> None:
        server = check.text("dns_server")
        assert server is not None
        try:
            ipaddress.ip_address(server)
        except ValueError:
            try:
                parse_hostport(server, "fly.dns_server")
            except ConfigError:
                raise check.fail("dns_server", f"expected an IP address like fdaa::3, got {server!r}") from None

    def private_url_for(self, instance_id: str) -> str:
        """The private-network URL of another machine's proxy (``private_url`` filled in)."""
        values = {"id": instance_id, "app": self.app or "", "port": str(self.private_port), "region": self.region or ""}
        return self.private_url.format(**values)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Size, time and connection limits. Sizes are bytes; times are seconds."""

    PATH: ClassVar[str] = "limits"
    max_header_bytes: int = field(default=16384, metadata={"kind": "size"})
    max_body_bytes: int = field(default=104857600, metadata={"kind": "size"})
    #: Request bodies up to this size are read whole before an instance connection is taken, so
    #: a slow sender holds no backend connection (nginx's ``proxy_request_buffering``); 0: stream all.
    request_buffer: int = field(default=65536, metadata={"kind": "size"})
    upstream_timeout: float = 30.0
    upstream_connect_timeout: float = 5.0
    client_timeout: float = 60.0
    max_ws_message_bytes: int = field(default=4194304, metadata={"kind": "size"})
    ws_heartbeat: float = 30.0
    max_connections: int = 10000
    max_connections_per_ip: int = 0

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.integer("max_header_bytes", 1024)
        check.integer("max_body_bytes", 1)
        check.integer("request_buffer", 0)
        check.integer("max_ws_message_bytes", 1)
        check.seconds("upstream_timeout")
        check.seconds("upstream_connect_timeout")
        check.seconds("client_timeout")
        check.seconds("ws_heartbeat", positive=False)
        check.integer("max_connections", 1)
        check.integer("max_connections_per_ip", 0)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging. ``level`` is stored upper-case; ``format`` is text or json. The environment
    variables LOG_LEVEL and LOG_FORMAT override the file when set (applied by the loader)."""

    PATH: ClassVar[str] = "log"
    LEVELS: ClassVar[tuple[str, ...]] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    level: str = "INFO"
    format: str = "text"

    def __post_init__(self) -> None:
        check = Check(self, self.PATH)
        check.choice("level", self.LEVELS)
        check.choice("format", ("text", "json"))
