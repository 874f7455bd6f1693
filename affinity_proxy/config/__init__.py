"""Configuration: YAML -> ``load_config()`` -> a frozen, validated ``Config`` tree.

The one import point for configuration: everything public is re-exported here (section classes
live in ``config_schema``, field checks in ``config_check``, value parsing in ``config_parse``, YAML
reading in ``config_load``). Loading is: read the file (the only I/O) -> ``yaml`` safe load
(duplicate keys are errors) -> ``expand_env`` on every string -> fill ``fly.*`` from FLY_* and
override ``log.*`` from LOG_LEVEL/LOG_FORMAT -> read each key with its type (unknown keys are
errors) -> build the dataclasses, which validate themselves -> ``require_runnable``. Every failure
is a ``ConfigError`` whose message starts with the key path. Must not import aiohttp, redis or
anything outside ``config_*`` and ``routing.model``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from affinity_proxy.config.check import Check
from affinity_proxy.config.load import (
    as_list,
    build_section,
    fill_from_env,
    read_field,
    read_yaml_file,
    unknown_key,
    user_key_source,
)
from affinity_proxy.config.parse import (
    ConfigError,
    expand_env,
    parse_duration,
    parse_hostport,
    parse_size,
    redact_url,
    type_name,
)
from affinity_proxy.config.schema import (
    AdminConfig,
    CookieConfig,
    FlyConfig,
    HealthConfig,
    InstanceConfig,
    LimitsConfig,
    LogConfig,
    PlacementConfig,
    ReaperConfig,
    RebalanceConfig,
    SessionCheckConfig,
    StoreConfig,
    UserKeySourceConfig,
)

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "CookieConfig",
    "FlyConfig",
    "HealthConfig",
    "InstanceConfig",
    "LimitsConfig",
    "LogConfig",
    "PlacementConfig",
    "ReaperConfig",
    "RebalanceConfig",
    "SessionCheckConfig",
    "StoreConfig",
    "UserKeySourceConfig",
    "config_from_mapping",
    "expand_env",
    "load_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
]

_SECTIONS: dict[str, type] = {
    "admin": AdminConfig, "cookie": CookieConfig, "session_check": SessionCheckConfig, "store": StoreConfig,
    "health": HealthConfig, "reaper": ReaperConfig, "fly": FlyConfig, "limits": LimitsConfig, "log": LogConfig,
    "placement": PlacementConfig,
}  # fmt: skip
#: Key paths whose values are secrets (``cookie.secret``, ...): ``${VAR}`` there must be set and non-empty.
SECRET_PATHS = frozenset(
    f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls) if f.metadata.get("secret")
)


def is_loopback_host(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``[::1]``, ``localhost``: a listener there is reachable from this host only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_secret_path(path: str) -> bool:
    """``cookie.secret``, ``cookie.previous_secrets[0]``, ``admin.token``, ``fly.api_token``."""
    return path.partition("[")[0] in SECRET_PATHS


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration. Cheap to build; validates itself (see module docstring).

    ``pin_ttl`` is the sliding expiry of a pin in seconds. ``listen``/``admin_listen`` are
    ``host:port``; read them split with ``listen_host``/``listen_port``/``admin_host``/``admin_port``.
    ``engine`` picks the main listener's HTTP server: ``fast`` (the default:
    ``affinity_proxy.engines.fast``, asyncio + httptools, which hands WebSockets and ``/_affinity/`` to
    the aiohttp application) or ``aiohttp`` (the aiohttp application alone, ~15x slower); read once
    at start.
    """

    MODES: ClassVar[tuple[str, ...]] = ("proxy", "fly")
    ENGINES: ClassVar[tuple[str, ...]] = ("aiohttp", "fast")
    mode: str = "proxy"
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:9091"
    admin: AdminConfig = field(default_factory=AdminConfig)
    instances: tuple[InstanceConfig, ...] = ()
    cookie: CookieConfig = field(default_factory=CookieConfig)
    user_key: tuple[UserKeySourceConfig, ...] = ()
    session_check: SessionCheckConfig = field(default_factory=SessionCheckConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    pin_ttl: float = 86400.0
    health: HealthConfig = field(default_factory=HealthConfig)
    reaper: ReaperConfig = field(default_factory=ReaperConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    fly: FlyConfig = field(default_factory=FlyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    engine: str = "fast"
    #: Peers whose X-Forwarded-*/Fly-Client-IP headers are believed (CIDRs). None: the mode's
    #: default (``[]`` in proxy mode, ``FLY_EDGE_PROXIES`` in fly mode); read ``trusted_proxy_cidrs``.
    trusted_proxies: tuple[str, ...] | None = field(default=None, metadata={"kind": "texts?"})

    def __post_init__(self) -> None:
        check = Check(self, "")
        check.choice("mode", self.MODES)
        check.choice("engine", self.ENGINES)
        for name in ("listen", "admin_listen"):
            host, port = parse_hostport(check.text(name), name)
            object.__setattr__(self, name, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        for name, cls in _SECTIONS.items():
            check.kind(name, cls, label=f"a {cls.__name__}")
        first_use: dict[str, int] = {}
        for i, instance in enumerate(check.items("instances", InstanceConfig)):
            if instance.id in first_use:
                raise ConfigError(
                    f"instances[{i}].id",
                    f"duplicate id {instance.id!r} (first used by instances[{first_use[instance.id]}])",
                )
            first_use[instance.id] = i
        check.items("user_key", UserKeySourceConfig)
        check.seconds("pin_ttl")
        if self.trusted_proxies is not None:
            object.__setattr__(self, "trusted_proxies", _check_cidrs(check.texts("trusted_proxies")))
        (host, port), (admin_host, admin_port) = self._hostports()
        wildcard = {"0.0.0.0", "::"}
        if port and port == admin_port and (host == admin_host or {host, admin_host} & wildcard):
            raise check.fail("admin_listen", f"must not use the same port as listen ({port})")

    def _hostports(self) -> tuple[tuple[str, int], tuple[str, int]]:
        return parse_hostport(self.listen, "listen"), parse_hostport(self.admin_listen, "admin_listen")

    @property
    def trusted_proxy_cidrs(self) -> tuple[str, ...]:
        """The effective ``trusted_proxies``: as configured, else the mode's default."""
        if self.trusted_proxies is not None:
            return self.trusted_proxies
        return FLY_EDGE_PROXIES if self.mode == "fly" else ()

    @property
    def listen_host(self) -> str:
        return parse_hostport(self.listen, "listen")[0]

    @property
    def listen_port(self) -> int:
        return parse_hostport(self.listen, "listen")[1]

    @property
    def admin_host(self) -> str:
        return parse_hostport(self.admin_listen, "admin_listen")[0]

    @property
    def admin_port(self) -> int:
        return parse_hostport(self.admin_listen, "admin_listen")[1]

    def require_runnable(self) -> None:
        """Raise ``ConfigError`` unless this config can run in its mode: proxy mode needs an
        instance; fly mode needs ``fly.machine_id``, ``fly.app`` for dns discovery and a Redis store
        for redis discovery. ``config_from_mapping`` calls it; code building a Config may too."""
        if self.mode == "proxy" and not self.instances:
            raise ConfigError("instances", "at least one instance is required in proxy mode")
        if self.mode != "fly":
            return
        if not self.fly.machine_id:
            raise ConfigError("fly.machine_id", "required in fly mode (set it or FLY_MACHINE_ID)")
        if self.fly.discovery in ("dns", "api") and not self.fly.app:
            need = f"required when fly.discovery is {self.fly.discovery} (set it or FLY_APP_NAME)"
            raise ConfigError("fly.app", need)
        if self.fly.discovery == "api" and not self.fly.api_token:
            raise ConfigError("fly.api_token", "required when fly.discovery is api (set it or FLY_API_TOKEN)")
        if self.fly.discovery == "redis" and self.store.kind != "redis":
            raise ConfigError("fly.discovery", "redis discovery needs a shared store: set store.url to redis://...")

    def require_cookie_secret(self) -> None:
        """Raise ``ConfigError`` when the affinity cookie is signed but has no secret (``serve`` calls it)."""
        if self.cookie.signed and not self.cookie.secret:
            raise ConfigError("cookie.secret", "required (set cookie.secret, or cookie.signed: false to run unsigned)")

    @property
    def admin_on_loopback(self) -> bool:
        """True when ``admin_listen`` binds only a loopback address (127.0.0.0/8, ::1, localhost)."""
        return is_loopback_host(self.admin_host)

    def require_admin_token(self) -> None:
        """Raise ``ConfigError`` when the admin listener is reachable from other hosts without a token
        (``serve`` calls it): anyone on the network could then drain, reap, reload and read every
        user key. Loopback-only listeners may run without one."""
        if not self.admin.token and not self.admin_on_loopback:
            raise ConfigError("admin.token", f"required when admin_listen is not a loopback address "
                                             f"({self.admin_listen}): set it (e.g. token: ${{ADMIN_TOKEN}}), "
                                             "or bind admin_listen to 127.0.0.1")

    def replace(self, **changes: Any) -> Config:
        """A copy with some top-level fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain JSON-serialisable data for logs and ``config check``:
        secrets are ``"***"`` (None stays None) and a password in ``store.url`` is ``***``."""
        result = _redact(self)
        assert isinstance(result, dict)
        result["trusted_proxies"] = list(self.trusted_proxy_cidrs)  # the effective list, mode default included
        return result


#: Where Fly's proxy connects to a Machine from, by default: its private IPv4 link (the Machine's
#: eth0 is in 172.16.0.0/12 and fly-proxy reaches it from that range). Fly does not document the
#: range; a config may name its own (README "Forwarding headers").
FLY_EDGE_PROXIES: tuple[str, ...] = ("172.16.0.0/12",)


def _check_cidrs(items: tuple[str, ...]) -> tuple[str, ...]:
    """``trusted_proxies`` entries: IP addresses or CIDRs without host bits, normalised."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=True)))
        except ValueError as err:
            raise ConfigError(f"trusted_proxies[{i}]", f"expected an IP address or a CIDR like 10.0.0.0/8 or "
                                                        f"fd00::/8, got {item!r} ({err})") from None
    return tuple(out)


def _redact(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("secret"):
                out[f.name] = [_mask(i) for i in item] if isinstance(item, tuple) else _mask(item)
            elif f.metadata.get("redact") == "url":
                out[f.name] = redact_url(item)
            else:
                out[f.name] = _redact(item)
        return out
    if isinstance(value, tuple | list):
        return [_redact(item) for item in value]
    return value


def _mask(value: Any) -> str | None:
    return None if value is None else "***"


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] = os.environ, *,
                secrets_optional: bool = False) -> Config:
    """Read, expand, validate. An empty file means all defaults (which proxy mode rejects: it
    needs instances). Missing or unreadable file, YAML syntax error, duplicate key or bad value ->
    ``ConfigError`` (the path is the file name for file-level problems). ``secrets_optional``: see
    ``config_from_mapping``."""
    data = read_yaml_file(path)
    return config_from_mapping({} if data is None else data, environ, secrets_optional=secrets_optional)


def config_from_mapping(data: Mapping[str, Any], environ: Mapping[str, str] | None = None, *,
                        secrets_optional: bool = False) -> Config:
    """Build a Config from parsed YAML data; ``environ`` (default ``os.environ``) feeds ``${VAR}``,
    FLY_* and LOG_*. Pure apart from reading ``environ``. Any problem -> ``ConfigError``; a secret's
    ``${VAR}`` unset or empty is one, unless ``secrets_optional`` (CLI store commands, which need
    neither the cookie secret nor, with ``--token``, the config's admin token): it is then null."""
    environ = os.environ if environ is None else environ
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the top level must be a mapping (mode: ..., listen: ...), got {type_name(data)}")
    data, sources = fill_from_env(expand_env(data, environ, secret=is_secret_path,
                                                secrets_optional=secrets_optional), environ)
    known = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    try:
        for key, value in data.items():
            if not isinstance(key, str) or key not in known:
                raise unknown_key("", key, known)
            if key in _SECTIONS:
                values[key] = build_section(_SECTIONS[key], value, key)
            elif key == "instances":
                values[key] = tuple(
                    build_section(InstanceConfig, item, f"instances[{i}]") for i, item in enumerate(as_list(value, key))
                )
            elif key == "user_key":
                values[key] = tuple(
                    user_key_source(item, f"user_key[{i}]") for i, item in enumerate(as_list(value, key))
                )
            else:
                values[key] = read_field(known[key], value, key)
        config = Config(**values)
    except ConfigError as err:
        source = sources.get(err.path)
        raise (err.with_note(f"from {source}") if source else err) from None
    config.require_runnable()
    return config
