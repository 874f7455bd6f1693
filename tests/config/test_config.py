"""Config: value parsing tables, every error path (messages start with the key path), environment
expansion and FLY_*/LOG_* fill, redaction, golden files for config/*.yaml, and property tests."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_proxy.config import (
    AdminConfig,
    Config,
    ConfigError,
    CookieConfig,
    FlyConfig,
    HealthConfig,
    InstanceConfig,
    LimitsConfig,
    LogConfig,
    PlacementConfig,
    ReaperConfig,
    SessionCheckConfig,
    StoreConfig,
    UserKeySourceConfig,
    config_from_mapping,
    expand_env,
    load_config,
    parse_duration,
    parse_hostport,
    parse_size,
)
from affinity_proxy.config.load import field_kind, read_yaml_file
from affinity_proxy.config.parse import EnvText, redact_url

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
GOLDEN_DIR = ROOT / "tests" / "golden"
EXAMPLES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

ONE = [{"id": "a", "url": "http://127.0.0.1:9001"}]  # the smallest valid instance list
SECTIONS = {
    "admin": AdminConfig, "cookie": CookieConfig, "session_check": SessionCheckConfig, "store": StoreConfig,
    "health": HealthConfig, "reaper": ReaperConfig, "fly": FlyConfig, "limits": LimitsConfig, "log": LogConfig,
    "placement": PlacementConfig,
}  # fmt: skip
ALL_CLASSES = [Config, InstanceConfig, UserKeySourceConfig, *SECTIONS.values()]


def load(data: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    """config_from_mapping with one instance unless the data names instances, and a clean environ."""
    return config_from_mapping({"instances": ONE, **data}, environ or {})


def error_of(data: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, environ or {})
    return str(info.value)


# --- defaults and direct construction ----------------------------------------------------------


def test_config_builds_with_defaults_in_code() -> None:
    config = Config()
    assert (config.mode, config.listen, config.admin_listen, config.pin_ttl) == (
        "proxy", "0.0.0.0:8080", "127.0.0.1:9091", 86400.0,
    )  # fmt: skip
    assert (config.listen_host, config.listen_port, config.admin_host, config.admin_port) == (
        "0.0.0.0", 8080, "127.0.0.1", 9091,
    )  # fmt: skip
    assert config.cookie == CookieConfig()
    assert config.cookie.name == "fly-instance-id" and config.cookie.max_age == 604800
    assert config.cookie.same_site == "Lax" and config.cookie.signed and config.cookie.secret is None
    assert config.store.url == "memory://" and config.store.kind == "memory"
    assert config.fly.discovery == "static" and config.fly.replay_status == 409
    assert config.limits.max_body_bytes == 100 * 2**20 and config.limits.max_connections_per_ip == 0
    assert config.log == LogConfig("INFO", "text")


def test_config_builds_from_parts_in_code() -> None:
    config = Config(instances=(InstanceConfig("a", "http://127.0.0.1:9001"),), cookie=CookieConfig(secret="s"))
    config.require_runnable()
    config.require_cookie_secret()
    assert config.instances[0].weight == 1
    assert dataclasses.replace(config, pin_ttl=5).pin_ttl == 5.0
    assert config.replace(mode="fly").mode == "fly"


def test_every_config_class_is_frozen_and_slotted() -> None:
    for cls in ALL_CLASSES:
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen and hasattr(cls, "__slots__"), cls
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().mode = "fly"  # type: ignore[misc]


def test_every_field_has_a_loader_kind() -> None:
    for cls in [InstanceConfig, *SECTIONS.values()]:
        for f in dataclasses.fields(cls):
            assert field_kind(f), (cls, f.name)


def test_direct_construction_normalises() -> None:
    assert LogConfig(level="debug", format="JSON") == LogConfig("DEBUG", "json")
    assert CookieConfig(same_site="none", secure=True, previous_secrets=["x"]).same_site == "None"  # type: ignore[arg-type]
    assert AdminConfig(allowed_hosts=["Admin.Example.", "b"]).allowed_hosts == ("admin.example", "b")  # type: ignore[arg-type]
    assert SessionCheckConfig("PUBLIC").lookup == "public"
    assert CookieConfig(previous_secrets=["x"]).previous_secrets == ("x",)  # type: ignore[arg-type]
    assert Config(mode="FLY", pin_ttl=60).pin_ttl == 60.0 and Config(mode="FLY").mode == "fly"
    assert Config(instances=[InstanceConfig("a", "http://h")]).instances == (InstanceConfig("a", "http://h"),)  # type: ignore[arg-type]
    assert UserKeySourceConfig("Header", "X-User").kind == "header"


DIRECT_ERRORS = [
    (lambda: CookieConfig(same_site="x"), "cookie.same_site: must be one of Strict, Lax, None"),
    (lambda: CookieConfig(name="bad name"), "cookie.name: must be a token"),
    (lambda: CookieConfig(max_age=0), "cookie.max_age: must be at least 1"),
    (lambda: CookieConfig(revalidate_after=-1), "cookie.revalidate_after: must be at least 0"),
    (lambda: CookieConfig(secret=""), "cookie.secret: must not be empty"),
    (lambda: CookieConfig(signed="yes"), "cookie.signed: expected true or false"),
    (lambda: InstanceConfig("a", "ftp://x"), "instances.url: must start with http:// or https://"),
    (lambda: InstanceConfig("-a", "http://x"), "instances.id: must be 1 to 64"),
    (lambda: InstanceConfig("a", "http://x", 0), "instances.weight: must be between 1 and 1000"),
    (lambda: InstanceConfig("a", "http://x", True), "instances.weight: expected an integer"),
    (lambda: StoreConfig(url="mongodb://x"), "store.url: scheme must be one of memory, redis, rediss, unix"),
    (lambda: StoreConfig(timeout=0), "store.timeout: must be greater than 0"),
    (lambda: ReaperConfig(interval="30s"), "reaper.interval: expected a number of seconds"),
    (lambda: FlyConfig(discovery="consul"), "fly.discovery: must be one of api, dns, redis, static"),
    (lambda: FlyConfig(replay_status=700), "fly.replay_status: must be between 200 and 599"),
    (lambda: LimitsConfig(max_header_bytes=10), "limits.max_header_bytes: must be at least 1024"),
    (lambda: LogConfig(level="verbose"), "log.level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (lambda: UserKeySourceConfig("body", "x"), "user_key.kind: must be one of header, query, cookie"),
    (lambda: Config(mode="edge"), "mode: must be one of proxy, fly"),
    (lambda: Config(listen="nope"), "listen: expected host:port"),
    (lambda: Config(cookie={"name": "x"}), "cookie: expected a CookieConfig"),  # type: ignore[arg-type]
    (lambda: Config(instances=("a",)), "instances[0]: expected a InstanceConfig"),  # type: ignore[arg-type]
    (
        lambda: Config(instances=(InstanceConfig("a", "http://h"), InstanceConfig("a", "http://i"))),
        "instances[1].id: duplicate id 'a'",
    ),
    (lambda: Config(admin_listen="0.0.0.0:8080"), "admin_listen: must not use the same port as listen (8080)"),
]


@pytest.mark.parametrize(("build", "message"), DIRECT_ERRORS)
def test_direct_construction_errors_name_the_key_path(build: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value).startswith(message)


def test_config_error_forms() -> None:
    err = ConfigError("cookie.secret", "required")
    assert (str(err), err.path, err.problem) == ("cookie.secret: required", "cookie.secret", "required")
    single = ConfigError("cookie.secret: required")
    assert (single.path, single.problem) == ("cookie.secret", "required")
    assert str(ConfigError("instances.url", "bad").rerooted("instances", "instances[3]")) == "instances[3].url: bad"
    assert ConfigError("cookie.x", "bad").rerooted("instances", "instances[3]").path == "cookie.x"
    assert str(pickle.loads(pickle.dumps(err))) == "cookie.secret: required"


# --- durations, sizes, host:port ---------------------------------------------------------------

DURATIONS = [
    (0, 0.0), (5, 5.0), (0.25, 0.25), ("5", 5.0), ("1.5", 1.5), ("250ms", 0.25), ("5s", 5.0),
    ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0), ("1h30m", 5400.0),
    ("1m30s500ms", 90.5), (" 7d ", 604800.0), ("3650d", 3650 * 86400.0),
]  # fmt: skip


@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value, "x.y") == pytest.approx(seconds)


BAD_DURATIONS = [
    ("-5s", "must not be negative"), (-1, "must not be negative"), ("-0.5", "must not be negative"),
    ("5 s", "expected a duration"), ("5S", "expected a duration"), ("five", "expected a duration"),
    ("", "expected a duration"), ("1e3", "expected a duration"), (".5s", "expected a duration"),
    ("5w", "expected a duration"), (True, "expected a duration"), (None, "expected a duration"),
    ([5], "expected a duration"), (math.nan, "expected a duration"), (math.inf, "must be at most 3650d"),
    (10**400, "must be at most 3650d"), ("3651d", "must be at most 3650d"), ("9" * 65, "expected a duration"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "problem"), BAD_DURATIONS)
def test_parse_duration_rejects(value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "health.interval")
    assert str(info.value).startswith(f"health.interval: {problem}")


SIZES = [
    (0, 0), (512, 512), ("512", 512), ("512B", 512), ("16KiB", 16384), ("1MiB", 2**20), ("1MB", 10**6),
    ("2GiB", 2 * 2**30), ("1kb", 1000), ("10 MiB", 10 * 2**20), ("1.5KiB", 1536), ("1TB", 10**12),
    (4096.0, 4096), ("1024TiB", 2**50),
]  # fmt: skip


@pytest.mark.parametrize(("value", "size"), SIZES)
def test_parse_size(value: Any, size: int) -> None:
    assert parse_size(value, "x") == size


BAD_SIZES = [
    ("abc", "expected a size like"), ("10XB", "expected a size like"), ("1e6", "expected a size like"),
    ("-1KiB", "must not be negative"), (-1, "must not be negative"), ("1.3B", "must be a whole number of bytes"),
    (1.5, "must be a whole number of bytes"), (True, "expected a size like"), (None, "expected a size like"),
    ("2PiB", "expected a size like"), (2**51, "must be at most 1PiB"), ("9" * 70, "expected a size like"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "problem"), BAD_SIZES)
def test_parse_size_rejects(value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "limits.max_body_bytes")
    assert str(info.value).startswith(f"limits.max_body_bytes: {problem}")


HOSTPORTS = [
    ("0.0.0.0:8080", ("0.0.0.0", 8080)), ("[::1]:9091", ("::1", 9091)), (":8080", ("::", 8080)),
    ("localhost:0", ("localhost", 0)), ("[::]:80", ("::", 80)), ("app.internal:65535", ("app.internal", 65535)),
    (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), HOSTPORTS)
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value, "listen") == expected


BAD_HOSTPORTS = [
    ("8080", "expected host:port"), (8080, "expected host:port"), ("host:", "port must be a number"),
    ("host:65536", "port must be a number"), ("host:http", "port must be a number"),
    ("::1:80", "IPv6 hosts need brackets"),
    ("[::1]", "expected host:port"), ("[nope]:80", "expected host:port"), ("bad_host:80", "expected host:port"),
    ("300.1.1.1:80", "expected host:port"), ("", "expected host:port"), ("a b:80", "expected host:port"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "problem"), BAD_HOSTPORTS)
def test_parse_hostport_rejects(value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hostport(value, "admin_listen")
    assert str(info.value).startswith(f"admin_listen: {problem}")


# --- ${VAR} expansion --------------------------------------------------------------------------

ENV = {"HOST": "example.com", "EMPTY": "", "PORT": "8080"}
EXPANSIONS = [
    ("plain", "plain"), ("${HOST}", "example.com"), ("http://${HOST}:${PORT}/", "http://example.com:8080/"),
    ("${UNSET:-fallback}", "fallback"), ("${EMPTY:-fallback}", "fallback"), ("${HOST:-fallback}", "example.com"),
    ("${EMPTY}", ""), ("${UNSET:-}", ""), ("${UNSET:-a:b-c d}", "a:b-c d"), ("$$", "$"), ("$${HOST}", "${HOST}"),
    ("price: 5$", "price: 5$"), ("$HOST", "$HOST"), ("a$$b$$$${HOST}", "a$b$${HOST}"), ("$$$$", "$$"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), EXPANSIONS)
def test_expand_env(text: str, expected: str) -> None:
    assert expand_env(text, ENV) == expected


def test_expand_env_marks_substituted_text_and_recurses() -> None:
    assert isinstance(expand_env("${HOST}", ENV), EnvText)
    assert not isinstance(expand_env("$$literal", ENV), EnvText)
    data = {"a": ["${HOST}", 1, None, {"b": "${PORT}"}], "${HOST}": True}
    assert expand_env(data, ENV) == {"a": ["example.com", 1, None, {"b": "8080"}], "${HOST}": True}
    assert data["a"][0] == "${HOST}"  # the input is not changed


EXPANSION_ERRORS = [
    ({"cookie": {"secret": "${COOKIE_SECRET}"}}, "cookie.secret: environment variable COOKIE_SECRET is not set"),
    ({"instances": [{"id": "a", "url": "http://${UP}"}]}, "instances[0].url: environment variable UP is not set"),
    ({"user_key": [{"header": "${H"}]}, "user_key[0].header: unterminated ${"),
    ({"listen": "${1BAD}"}, "listen: bad variable reference ${1BAD}"),
    ({"listen": "${}"}, "listen: bad variable reference ${}"),
    ({"listen": "${A:=b}"}, "listen: bad variable reference ${A:=b}"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), EXPANSION_ERRORS)
def test_expand_env_errors_name_path_and_variable(data: dict[str, Any], message: str) -> None:
    assert error_of(data).startswith(message)


def test_unset_variables_are_all_named_in_one_line() -> None:
    data = {"admin": {"token": "${ADMIN_TOKEN}"}, "cookie": {"secret": "${COOKIE_SECRET}"},
            "store": {"url": "${REDIS_URL}"}, "listen": "${LISTEN:-:8080}"}
    assert error_of(data) == (
        "admin.token: environment variable ADMIN_TOKEN is not set (a secret has no default: set it, e.g. "
        "ADMIN_TOKEN=$(openssl rand -hex 32)); also missing: COOKIE_SECRET (cookie.secret), REDIS_URL (store.url)")
    assert error_of({"store": {"url": "${REDIS_URL}"}}) == (
        "store.url: environment variable REDIS_URL is not set (set it, or write ${REDIS_URL:-default})")


@pytest.mark.parametrize("path", ["admin.token", "cookie.secret", "cookie.previous_secrets", "fly.api_token"])
def test_a_secret_from_an_empty_variable_is_an_error(path: str) -> None:
    section, key = path.split(".")
    value: Any = ["${S}"] if key == "previous_secrets" else "${S}"
    where = path + ("[0]" if key == "previous_secrets" else "")
    assert error_of({section: {key: value}}, {"S": ""}).startswith(f"{where}: environment variable S is empty")
    assert load({"admin": {"token": "${S:-}"}}, {"S": ""}).admin.token is None  # an explicit empty default
    assert load({"cookie": {"domain": "${S}"}}, {"S": ""}).cookie.domain is None  # not a secret: empty is null


def test_secrets_optional_reads_unset_secrets_as_null_but_not_other_keys() -> None:
    data = {"instances": ONE, "admin": {"token": "${ADMIN_TOKEN}"}, "cookie": {"secret": "${COOKIE_SECRET}"}}
    config = config_from_mapping(data, {}, secrets_optional=True)
    assert config.admin.token is None and config.cookie.secret is None
    with pytest.raises(ConfigError, match=r"store\.url: environment variable REDIS_URL is not set"):
        config_from_mapping({**data, "store": {"url": "${REDIS_URL}"}}, {}, secrets_optional=True)


@pytest.mark.parametrize(("admin_listen", "needs_token"), [
    ("127.0.0.1:9091", False), ("127.8.9.10:9091", False), ("[::1]:9091", False), ("localhost:9091", False),
    (":9091", True), ("0.0.0.0:9091", True), ("[::]:9091", True), ("10.0.0.5:9091", True),
    ("[fdaa::3]:9091", True), ("admin.internal:9091", True),
])  # fmt: skip
def test_admin_token_is_required_off_loopback(admin_listen: str, needs_token: bool) -> None:
    config = load({"admin_listen": admin_listen})
    assert config.admin_on_loopback is not needs_token
    if needs_token:
        with pytest.raises(ConfigError) as info:
            config.require_admin_token()
        assert str(info.value).startswith("admin.token: required when admin_listen is not a loopback address")
    else:
        config.require_admin_token()
    load({"admin_listen": admin_listen, "admin": {"token": "t"}}).require_admin_token()


def test_values_from_the_environment_take_the_keys_type() -> None:
    env = {"SECURE": "true", "WEIGHT": "3", "TTL": "2h", "BODY": "1MiB", "OFF": "off", "DOMAIN": ""}
    config = config_from_mapping(
        {
            "instances": [{"id": "a", "url": "http://h", "weight": "${WEIGHT}"}],
            "cookie": {"secure": "${SECURE}", "http_only": "${OFF}", "domain": "${DOMAIN}", "max_age": "${TTL}"},
            "pin_ttl": "${TTL}",
            "limits": {"max_body_bytes": "${BODY}"},
            "admin": {"token": "${UNSET:-}"},
        },
        env,
    )
    assert config.instances[0].weight == 3
    assert config.cookie.secure is True and config.cookie.http_only is False and config.cookie.domain is None
    assert config.cookie.max_age == 7200 and config.pin_ttl == 7200.0
    assert config.limits.max_body_bytes == 2**20 and config.admin.token is None
    assert type(config.instances[0].url) is str  # no EnvText leaks into the tree


# --- error paths -------------------------------------------------------------------------------

ERRORS: list[tuple[dict[Any, Any], str]] = [  # data is merged over {"instances": ONE}
    # top level and sections
    ({"colour": 1}, "colour: unknown key (known: mode, listen, admin_listen, admin, instances,"),
    ({"pin_tll": 1}, "pin_tll: unknown key (known: "),
    ({3: 1}, "3: unknown key"),
    ({"cookie": "x"}, "cookie: expected a mapping, got 'x'"),
    ({"cookie": {"colour": "red"}}, "cookie.colour: unknown key (known: name, secret, previous_secrets,"),
    ({"fly": {"ap": "x"}}, "fly.ap: unknown key (known: app, machine_id,"),
    ({"log": {"lvl": "x"}}, "log.lvl: unknown key (known: level, format)"),
    ({"limits": {"max_body": 1}}, "limits.max_body: unknown key"),
    ({"mode": "edge"}, "mode: must be one of proxy, fly, got 'edge'"),
    ({"mode": None}, "mode: expected a string, got null"),
    ({"listen": 8080}, "listen: expected a string, got 8080 (quote it in YAML)"),
    ({"listen": "[::1]"}, "listen: expected host:port"),
    ({"admin_listen": "127.0.0.1:99999"}, "admin_listen: port must be a number from 0 to 65535"),
    ({"listen": "127.0.0.1:9091"}, "admin_listen: must not use the same port as listen (9091)"),
    ({"pin_ttl": "forever"}, "pin_ttl: expected a duration like"),
    ({"pin_ttl": 0}, "pin_ttl: must be greater than 0"),
    ({"admin": {"token": 1234}}, "admin.token: expected a string, got an integer (quote it in YAML)"),
    ({"admin": {"token": ""}}, "admin.token: must not be empty (leave it out or use null)"),
    # instances
    ({"instances": []}, "instances: at least one instance is required in proxy mode"),
    ({"instances": {"a": "http://h"}}, "instances: expected a list, got a mapping"),
    ({"instances": ["http://h"]}, "instances[0]: expected a mapping, got 'http://h'"),
    ({"instances": [{"url": "http://h"}]}, "instances[0].id: required"),
    ({"instances": [{"id": "a"}]}, "instances[0].url: required"),
    ({"instances": [*ONE, {"id": "b", "port": 1}]}, "instances[1].port: unknown key (known: id, url, weight)"),
    ({"instances": [*ONE, {"id": "a", "url": "http://h"}]}, "instances[1].id: duplicate id 'a'"),
    ({"instances": [{"id": "no spaces", "url": "http://h"}]}, "instances[0].id: must be 1 to 64 letters"),
    ({"instances": [{"id": "x" * 65, "url": "http://h"}]}, "instances[0].id: must be 1 to 64 letters"),
    ({"instances": [{"id": 1, "url": "http://h"}]}, "instances[0].id: expected a string, got 1 (quote it in YAML)"),
    ({"instances": [{"id": "a", "url": "127.0.0.1:9001"}]}, "instances[0].url: must start with http:// or https://"),
    ({"instances": [{"id": "a", "url": "http://"}]}, "instances[0].url: must name a host"),
    ({"instances": [{"id": "a", "url": "http://h:99999"}]}, "instances[0].url: is not a valid URL"),
    ({"instances": [{"id": "a", "url": "http://h/app"}]}, "instances[0].url: must be scheme://host[:port] with no"),
    ({"instances": [{"id": "a", "url": "http://u:p@h"}]}, "instances[0].url: must not contain credentials"),
    ({"instances": [{**ONE[0], "weight": 0}]}, "instances[0].weight: must be between 1 and 1000, got 0"),
    ({"instances": [{**ONE[0], "weight": 1001}]}, "instances[0].weight: must be between 1 and 1000"),
    ({"instances": [{**ONE[0], "weight": 1.5}]}, "instances[0].weight: expected an integer, got 1.5"),
    ({"instances": [{**ONE[0], "weight": "2"}]}, "instances[0].weight: expected an integer, got '2' (write"),
    # cookie
    ({"cookie": {"same_site": "x"}}, "cookie.same_site: must be one of Strict, Lax, None, got 'x'"),
    ({"cookie": {"same_site": None}}, "cookie.same_site: expected a string, got null"),
    ({"cookie": {"same_site": "None"}}, "cookie.same_site: None needs secure: true (browsers drop"),
    ({"cookie": {"same_site": "none", "secure": False}}, "cookie.same_site: None needs secure: true"),
    # admin and session_check
    ({"admin": {"allowed_hosts": "a.example"}}, "admin.allowed_hosts: expected a list"),
    ({"admin": {"allowed_hosts": ["ok.example", "bad host"]}}, "admin.allowed_hosts[1]: must be a DNS name"),
    ({"admin": {"allowed_hosts": ["ok", ""]}}, "admin.allowed_hosts[1]: expected a non-empty string"),
    ({"admin": {"allowed_hosts": [7]}}, "admin.allowed_hosts[0]: expected a string, got 7"),
    ({"session_check": {"lookup": "anyone"}}, "session_check.lookup: must be one of admin, public, got 'anyone'"),
    ({"session_check": {"lookup": None}}, "session_check.lookup: expected a string, got null"),
    ({"session_check": {"lokup": "admin"}}, "session_check.lokup: unknown key (known: lookup); did you mean lookup?"),
    ({"cookie": {"name": "my cookie"}}, "cookie.name: must be a token"),
    ({"cookie": {"name": "a;b"}}, "cookie.name: must be a token"),
    ({"cookie": {"secret": 12345}}, "cookie.secret: expected a string, got an integer"),
    ({"cookie": {"previous_secrets": "old"}}, "cookie.previous_secrets: expected a list, got a string"),
    ({"cookie": {"previous_secrets": ["ok", ""]}}, "cookie.previous_secrets[1]: expected a non-empty string"),
    ({"cookie": {"previous_secrets": ["ok", 7]}}, "cookie.previous_secrets[1]: expected a string, got an integer"),
    ({"cookie": {"signed": "no"}}, "cookie.signed: expected true or false, got 'no'"),
    ({"cookie": {"secure": "true"}}, "cookie.secure: expected true or false, got 'true' (write it without quotes)"),
    ({"cookie": {"http_only": 1}}, "cookie.http_only: expected true or false, got 1"),
    ({"cookie": {"max_age": 0}}, "cookie.max_age: must be at least 1, got 0"),
    ({"cookie": {"max_age": "1.5s"}}, "cookie.max_age: must be a whole number of seconds"),
    ({"cookie": {"revalidate_after": "-1s"}}, "cookie.revalidate_after: must not be negative"),
    ({"cookie": {"path": "app"}}, "cookie.path: must be a path starting with /"),
    ({"cookie": {"path": "/a;b"}}, "cookie.path: must be a path starting with /"),
    ({"cookie": {"domain": "exa mple.com"}}, "cookie.domain: must be a DNS name"),
    ({"cookie": {"domain": ""}}, "cookie.domain: must not be empty"),
    # user_key
    ({"user_key": {"header": "X"}}, "user_key: expected a list, got a mapping"),
    ({"user_key": ["X-User-Id"]}, "user_key[0]: expected a mapping like {header: X-User-Id}"),
    ({"user_key": [{"header": "X", "query": "u"}]}, "user_key[0]: expected exactly one of header, query, cookie, got"),
    ({"user_key": [{}]}, "user_key[0]: expected exactly one of header, query, cookie, got none"),
    ({"user_key": [{"header": "X"}, {"body": "user"}]}, "user_key[1].body: unknown key (known: header, query, cookie)"),
    ({"user_key": [{"header": "X User"}]}, "user_key[0].header: must be a header name"),
    ({"user_key": [{"cookie": "a=b"}]}, "user_key[0].cookie: must be a cookie name"),
    ({"user_key": [{"query": ""}]}, "user_key[0].query: must not be empty"),
    ({"user_key": [{"query": None}]}, "user_key[0].query: expected a string, got null"),
    # store
    ({"store": {"url": "mysql://db"}}, "store.url: scheme must be one of memory, redis, rediss, unix, redis+cluster, "
                                       "redis+sentinel, got 'mysql://db'"),
    ({"store": {"url": "http://:hunter2@h"}}, "store.url: scheme must be one of memory, redis, rediss, unix, "
                                              "redis+cluster, redis+sentinel, got 'http://:***@h'"),
    ({"store": {"url": "memory://x"}}, "store.url: the memory store takes no options"),
    ({"store": {"url": "redis://"}}, "store.url: must name a host"),
    ({"store": {"url": "redis://h:6379/x"}}, "store.url: the path must be a database number"),
    ({"store": {"url": "redis://h:70000"}}, "store.url: is not a valid URL"),
    ({"store": {"url": "unix://"}}, "store.url: must name a socket path"),
    ({"store": {"key_prefix": "a b"}}, "store.key_prefix: expected a string without spaces"),
    ({"store": {"timeout": 0}}, "store.timeout: must be greater than 0"),
    # health, reaper
    ({"health": {"path": "healthz"}}, "health.path: must be a path starting with /"),
    ({"health": {"interval": "0s"}}, "health.interval: must be greater than 0"),
    ({"health": {"timeout": "0s"}}, "health.timeout: must be greater than 0"),
    ({"health": {"unhealthy_after": 0}}, "health.unhealthy_after: must be between 1 and 100"),
    ({"health": {"healthy_after": "2"}}, "health.healthy_after: expected an integer"),
    ({"reaper": {"interval": 0}}, "reaper.interval: must be greater than 0"),
    ({"reaper": {"grace": "soon"}}, "reaper.grace: expected a duration like"),
    # fly
    ({"fly": {"discovery": "consul"}}, "fly.discovery: must be one of api, dns, redis, static, got 'consul'"),
    ({"fly": {"replay_status": 199}}, "fly.replay_status: must be between 200 and 599, got 199"),
    ({"fly": {"replay_status": 600}}, "fly.replay_status: must be between 200 and 599"),
    ({"fly": {"machine_id": "not valid!"}}, "fly.machine_id: must be 1 to 64 letters"),
    ({"fly": {"app": "my_app"}}, "fly.app: must be a Fly app name"),
    ({"fly": {"region": "a m s"}}, "fly.region: must be a region code"),
    ({"fly": {"upstream": "localhost:3000"}}, "fly.upstream: must start with http:// or https://"),
    ({"fly": {"private_url": "http://{app}.internal"}}, "fly.private_url: must contain {id}"),
    ({"fly": {"private_url": "http://{id}.{host}"}}, "fly.private_url: may only use the placeholders"),
    ({"fly": {"private_url": "http://{id"}}, "fly.private_url: must contain {id}"),
    ({"fly": {"private_url": "tcp://{id}:1"}}, "fly.private_url: must start with http:// or https://"),
    ({"fly": {"private_port": 0}}, "fly.private_port: must be between 1 and 65535"),
    ({"fly": {"dns_server": "resolver"}}, "fly.dns_server: expected an IP address like fdaa::3"),
    ({"fly": {"prefer_instance": "yes"}}, "fly.prefer_instance: expected true or false"),
    ({"fly": {"replay_timeout": 0}}, "fly.replay_timeout: must be greater than 0"),
    ({"fly": {"api_url": "api.machines.dev"}}, "fly.api_url: must start with http:// or https://"),
    ({"mode": "fly"}, "fly.machine_id: required in fly mode (set it or FLY_MACHINE_ID)"),
    ({"mode": "fly", "fly": {"machine_id": "m1", "discovery": "dns"}}, "fly.app: required when fly.discovery is dns"),
    ({"mode": "fly", "fly": {"machine_id": "m", "discovery": "redis"}}, "fly.discovery: redis discovery needs a"),
    # limits, log
    ({"limits": {"max_body_bytes": "abc"}}, "limits.max_body_bytes: expected a size like 512B, 16KiB, 10MiB"),
    ({"limits": {"max_body_bytes": 0}}, "limits.max_body_bytes: must be at least 1, got 0"),
    ({"limits": {"max_header_bytes": "512B"}}, "limits.max_header_bytes: must be at least 1024"),
    ({"limits": {"request_buffer": -1}}, "limits.request_buffer: must not be negative, got -1"),
    ({"limits": {"request_buffer": "64K"}}, "limits.request_buffer: expected a size like 512B, 16KiB"),
    ({"limits": {"max_ws_message_bytes": "1.5B"}}, "limits.max_ws_message_bytes: must be a whole number"),
    ({"limits": {"upstream_timeout": 0}}, "limits.upstream_timeout: must be greater than 0"),
    ({"limits": {"upstream_connect_timeout": "-1"}}, "limits.upstream_connect_timeout: must not be negative"),
    ({"limits": {"client_timeout": [1]}}, "limits.client_timeout: expected a duration"),
    ({"limits": {"ws_heartbeat": "1y"}}, "limits.ws_heartbeat: expected a duration"),
    ({"limits": {"max_connections": 0}}, "limits.max_connections: must be at least 1"),
    ({"limits": {"max_connections_per_ip": -1}}, "limits.max_connections_per_ip: must be at least 0"),
    ({"log": {"level": "verbose"}}, "log.level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ({"log": {"format": "xml"}}, "log.format: must be one of text, json, got 'xml'"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), ERRORS)
def test_errors_start_with_the_key_path(data: dict[Any, Any], message: str) -> None:
    assert error_of({"instances": ONE, **data}).startswith(message)


def test_top_level_must_be_a_mapping() -> None:
    assert error_of([1, 2]) == "the top level must be a mapping (mode: ..., listen: ...), got a list"


def test_unknown_key_suggests_a_close_name() -> None:
    assert error_of({"instances": ONE, "cookie": {"same_sit": "Lax"}}).endswith("; did you mean same_site?")
    assert "did you mean" not in error_of({"instances": ONE, "cookie": {"colour": "red"}})


def test_secret_values_never_appear_in_error_messages() -> None:
    message = error_of({"instances": ONE, "cookie": {"previous_secrets": ["ok", 424242]}})
    assert "424242" not in message
    assert "hunter2" not in error_of({"instances": ONE, "store": {"url": "redis://:hunter2@h:6379/x"}})
    assert "s3cr3t" not in error_of({"instances": ONE, "cookie": {"secret": ["s3cr3t"]}})


def test_valid_values_are_accepted_and_normalised() -> None:
    config = load(
        {
            "mode": "PROXY",
            "listen": ":8081",
            "admin_listen": "[::1]:0",
            "cookie": {"same_site": "strict", "max_age": "1h", "revalidate_after": 0, "domain": "example.com"},
            "user_key": [{"header": "X-User-Id"}, {"query": "user id"}, {"cookie": "sid"}],
            "store": {"url": "rediss://user:pw@redis.example:6380/3", "timeout": "100ms", "key_prefix": ""},
            "health": {"interval": "10s", "timeout": "10s"},
            "limits": {"ws_heartbeat": 0, "max_connections_per_ip": 8},
            "log": {"level": "warning", "format": "JSON"},
            "fly": {"dns_server": "127.0.0.1:5353", "replay_timeout": "2s", "api_url": "https://api.machines.dev/v1"},
        }
    )
    assert (config.mode, config.listen_port, config.admin_host, config.admin_port) == ("proxy", 8081, "::1", 0)
    assert (config.cookie.same_site, config.cookie.max_age, config.cookie.revalidate_after) == ("Strict", 3600, 0.0)
    assert [(s.kind, s.name) for s in config.user_key] == [
        ("header", "X-User-Id"),
        ("query", "user id"),
        ("cookie", "sid"),
    ]
    assert config.store.kind == "redis" and config.store.timeout == 0.1 and config.store.key_prefix == ""
    assert (config.log.level, config.log.format) == ("WARNING", "json")
    assert config.fly.replay_timeout == 2.0


def test_store_url_schemes() -> None:
    for url in ("memory://", "redis://localhost", "redis://:pw@h:6379/0", "rediss://h", "unix:///run/redis.sock?db=1"):
        assert load({"store": {"url": url}}).store.url == url


def test_fly_private_url_for() -> None:
    fly = FlyConfig(app="shop", private_port=3000)
    assert fly.private_url_for("148e21ea7d5389") == "http://148e21ea7d5389.vm.shop.internal:3000"


def test_require_cookie_secret() -> None:
    with pytest.raises(ConfigError) as info:
        Config().require_cookie_secret()
    assert str(info.value) == "cookie.secret: required (set cookie.secret, or cookie.signed: false to run unsigned)"
    Config(cookie=CookieConfig(signed=False)).require_cookie_secret()
    Config(cookie=CookieConfig(secret="s")).require_cookie_secret()


def test_fly_mode_needs_no_instances() -> None:
    config = config_from_mapping({"mode": "fly", "fly": {"machine_id": "m1"}}, {})
    assert config.instances == () and config.fly.machine_id == "m1"
    redis = {"mode": "fly", "fly": {"machine_id": "m1", "discovery": "redis"}, "store": {"url": "redis://h"}}
    assert config_from_mapping(redis, {}).fly.discovery == "redis"


# --- FLY_* and LOG_* from the environment ------------------------------------------------------

FLY_FILL = [
    ({"FLY_MACHINE_ID": "148e21ea7d5389"}, {}, "148e21ea7d5389"),
    ({"FLY_ALLOC_ID": "148e21ea7d5389"}, {}, "148e21ea7d5389"),
    ({"FLY_ALLOC_ID": "d4a9b6f2-1c3e-4b5a-9f7d-0a1b2c3d4e5f"}, {}, "d4a9b6f2-1c3e-4b5a-9f7d-0a1b2c3d4e5f"),
    ({"FLY_ALLOC_ID": "abc-def!"}, {}, "abc"),
    ({"FLY_MACHINE_ID": "from-machine", "FLY_ALLOC_ID": "from-alloc"}, {}, "from-machine"),
    ({"FLY_MACHINE_ID": "", "FLY_ALLOC_ID": "from-alloc"}, {}, "from-alloc"),
    ({"FLY_MACHINE_ID": "from-env"}, {"machine_id": "explicit"}, "explicit"),
    ({"FLY_MACHINE_ID": "from-env"}, {"machine_id": None}, "from-env"),
    ({"FLY_MACHINE_ID": "from-env"}, {"machine_id": "${UNSET:-}"}, "from-env"),
    ({}, {}, None),
]  # fmt: skip


@pytest.mark.parametrize(("environ", "fly", "machine_id"), FLY_FILL)
def test_fly_machine_id_from_environment(environ: dict[str, str], fly: dict[str, Any], machine_id: str | None) -> None:
    assert load({"fly": fly}, environ).fly.machine_id == machine_id


def test_fly_keys_from_environment() -> None:
    env = {"FLY_MACHINE_ID": "m1", "FLY_APP_NAME": "shop", "FLY_REGION": "ams", "FLY_API_TOKEN": "tok"}
    config = config_from_mapping({"mode": "fly", "fly": {"discovery": "dns"}}, env)
    assert (config.fly.machine_id, config.fly.app, config.fly.region, config.fly.api_token) == (
        "m1",
        "shop",
        "ams",
        "tok",
    )
    explicit = config_from_mapping({"mode": "fly", "fly": {"app": "mine", "region": "iad"}}, env)
    assert (explicit.fly.app, explicit.fly.region) == ("mine", "iad")


def test_bad_fly_environment_values_say_where_they_came_from() -> None:
    message = error_of({"instances": ONE}, {"FLY_MACHINE_ID": "bad id!"})
    assert message.startswith("fly.machine_id: must be 1 to 64") and message.endswith("(from FLY_MACHINE_ID)")
    assert error_of({"instances": ONE}, {"FLY_REGION": "a m s"}).endswith("(from FLY_REGION)")


def test_fly_fill_leaves_a_malformed_section_to_the_validator() -> None:
    assert error_of({"instances": ONE, "fly": ["x"]}, {"FLY_MACHINE_ID": "m1"}).startswith("fly: expected a mapping")
    assert error_of({"instances": ONE, "log": "x"}, {"LOG_LEVEL": "debug"}).startswith("log: expected a mapping")


LOG_OVERRIDES = [
    ({}, {}, ("INFO", "text")),
    ({"level": "debug"}, {}, ("DEBUG", "text")),
    ({"level": "debug", "format": "json"}, {"LOG_LEVEL": "error"}, ("ERROR", "json")),
    ({"format": "json"}, {"LOG_FORMAT": "text", "LOG_LEVEL": "Warning"}, ("WARNING", "text")),
    ({"level": "debug"}, {"LOG_LEVEL": ""}, ("DEBUG", "text")),
]  # fmt: skip


@pytest.mark.parametrize(("log", "environ", "expected"), LOG_OVERRIDES)
def test_log_environment_wins(log: dict[str, str], environ: dict[str, str], expected: tuple[str, str]) -> None:
    config = load({"log": log}, environ)
    assert (config.log.level, config.log.format) == expected


def test_bad_log_environment_value_names_the_variable() -> None:
    message = error_of({"instances": ONE}, {"LOG_LEVEL": "loud"})
    assert message == "log.level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud' (from LOG_LEVEL)"


# --- redaction ---------------------------------------------------------------------------------

SECRET_VALUES = ["cookie-secret-1", "old-secret-2", "admin-token-3", "fly-token-4", "redis-password-5"]


def secret_config() -> Config:
    return load(
        {
            "admin": {"token": "admin-token-3"},
            "cookie": {"secret": "cookie-secret-1", "previous_secrets": ["old-secret-2"]},
            "fly": {"api_token": "fly-token-4"},
            "store": {"url": "redis://default:redis-password-5@h:6379/0?password=redis-password-5"},
        }
    )


def test_redacted_masks_every_secret() -> None:
    redacted = secret_config().redacted()
    text = json.dumps(redacted)
    for secret in SECRET_VALUES:
        assert secret not in text
    assert redacted["cookie"]["secret"] == "***" and redacted["cookie"]["previous_secrets"] == ["***"]
    assert redacted["admin"]["token"] == "***" and redacted["fly"]["api_token"] == "***"
    assert redacted["store"]["url"] == "redis://default:***@h:6379/0?password=***"


def test_redacted_keeps_none_secrets_and_is_plain_data() -> None:
    redacted = Config().redacted()
    assert redacted["cookie"]["secret"] is None and redacted["admin"]["token"] is None
    assert redacted["fly"]["api_token"] is None and redacted["cookie"]["previous_secrets"] == []
    assert json.loads(json.dumps(redacted)) == redacted
    assert set(redacted) == {f.name for f in dataclasses.fields(Config)}


def test_repr_hides_secrets() -> None:
    text = repr(secret_config())
    for secret in SECRET_VALUES:
        assert secret not in text


REDACT_URLS = [
    ("memory://", "memory://"), ("redis://h:6379/0", "redis://h:6379/0"), ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:pw@h", "rediss://user:***@h"), ("redis://user@h", "redis://user@h"), ("redis://:p@ss@h/1", "redis://:***@h/1"),
    ("unix:///s.sock?db=0&password=pw", "unix:///s.sock?db=0&password=***"), ("redis://[::1", "***"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "expected"), REDACT_URLS)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


# --- files: load_config, examples and goldens --------------------------------------------------


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match=r": cannot read the file"):
        load_config(tmp_path, {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("instances:\n  - id: a\n   url: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML: .* at line 3, column 4"):
        load_config(bad, {})
    bad.write_text("cookie:\n  name: a\n  name: b\n")
    with pytest.raises(ConfigError, match=r"invalid YAML: .*duplicate key 'name' \(line 3, column 3\)"):
        load_config(bad, {})
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"^the top level must be a mapping"):
        load_config(bad, {})
    bad.write_bytes(b"mode: \xff\n")
    with pytest.raises(ConfigError, match=r"cannot read the file"):
        load_config(bad, {})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"^instances: at least one instance is required in proxy mode$"):
        load_config(empty, {})
    fly = tmp_path / "fly.yaml"
    fly.write_text("mode: fly\n")
    config = load_config(fly, {"FLY_MACHINE_ID": "m1"})
    assert config == Config(mode="fly", fly=FlyConfig(machine_id="m1"))


def test_yaml_merge_keys_may_override(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("instances:\n  - &a {id: a, url: 'http://h', weight: 2}\n  - <<: *a\n    id: b\n")
    config = load_config(path, {})
    assert [(i.id, i.weight) for i in config.instances] == [("a", 2), ("b", 2)]


def test_load_config_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("instances: [{id: a, url: 'http://${UPSTREAM}'}]\n")
    monkeypatch.setenv("UPSTREAM", "backend.internal:9000")
    assert load_config(path).instances[0].url == "http://backend.internal:9000"


GOLDEN_ENV = {
    "COOKIE_SECRET": "golden-cookie-secret-3f9a",
    "ADMIN_TOKEN": "golden-admin-token-77c1",
    "REDIS_URL": "redis://:golden-redis-password@redis.internal:6379/2",
    "FLY_MACHINE_ID": "e784079b449483",
    "FLY_APP_NAME": "golden-app",
    "FLY_REGION": "ams",
    "FLY_API_TOKEN": "golden-fly-api-token",
}
GOLDEN_SECRETS = [
    "golden-cookie-secret-3f9a",
    "golden-admin-token-77c1",
    "golden-redis-password",
    "golden-fly-api-token",
]


def test_there_are_examples() -> None:
    assert {"proxy", "minimal", "fly", "redis"} <= set(EXAMPLES)


#: What each shipped config needs from the environment (no defaults: see tests/test_shipped_secrets.py).
EXAMPLE_NEEDS = {
    "fly": ["ADMIN_TOKEN", "COOKIE_SECRET", "REDIS_URL"],
    "minimal": ["COOKIE_SECRET"],
    "proxy": ["ADMIN_TOKEN", "COOKIE_SECRET"],
    "redis": ["ADMIN_TOKEN", "COOKIE_SECRET", "REDIS_URL"],
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_refuses_to_load_without_its_secrets(name: str) -> None:
    """Every missing variable is named in one message; nothing falls back to a usable value."""
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR / f"{name}.yaml", {})
    message = str(info.value)
    assert [v for v in sorted(GOLDEN_ENV) if v in message] == EXAMPLE_NEEDS[name], message
    assert "\n" not in message


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads_with_its_secrets_and_can_serve(name: str) -> None:
    env = {k: GOLDEN_ENV[k] for k in EXAMPLE_NEEDS[name]} | {"FLY_MACHINE_ID": "e784079b449483"}
    config = load_config(CONFIG_DIR / f"{name}.yaml", env)
    config.require_cookie_secret()
    config.require_admin_token()
    for missing in EXAMPLE_NEEDS[name]:
        with pytest.raises(ConfigError, match=f"environment variable {missing} is not set"):
            load_config(CONFIG_DIR / f"{name}.yaml", {k: v for k, v in env.items() if k != missing})


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_matches_golden(name: str) -> None:
    """Regenerate with UPDATE_GOLDEN=1 and review the diff."""
    config = load_config(CONFIG_DIR / f"{name}.yaml", GOLDEN_ENV)
    text = json.dumps(config.redacted(), indent=2, sort_keys=True) + "\n"
    for secret in GOLDEN_SECRETS:
        assert secret not in text
    golden = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with UPDATE_GOLDEN=1"
    assert text == golden.read_text()


def _reference() -> dict[str, Any]:
    data = read_yaml_file(CONFIG_DIR / "proxy.yaml")
    assert isinstance(data, dict)
    return data


def test_reference_config_lists_every_key() -> None:
    data = _reference()
    assert list(data) == [f.name for f in dataclasses.fields(Config)]
    for name, cls in SECTIONS.items():
        assert list(data[name]) == [f.name for f in dataclasses.fields(cls)], name
    assert set(data["instances"][0]) == {f.name for f in dataclasses.fields(InstanceConfig)}
    assert {kind for item in data["user_key"] for kind in item} == set(UserKeySourceConfig.KINDS)


def test_reference_config_shows_the_defaults() -> None:
    """Every value in config/proxy.yaml is the default, except the few that cannot be."""
    env = {k: GOLDEN_ENV[k] for k in EXAMPLE_NEEDS["proxy"]}
    config, default = load_config(CONFIG_DIR / "proxy.yaml", env), Config()
    examples = {("cookie", "secret"), ("admin", "token")}
    for name in SECTIONS:
        for f in dataclasses.fields(getattr(default, name)):
            if (name, f.name) not in examples:
                assert getattr(getattr(config, name), f.name) == getattr(getattr(default, name), f.name), (name, f.name)
    for f in dataclasses.fields(Config):
        if f.name not in SECTIONS and f.name not in ("instances", "user_key"):
            assert getattr(config, f.name) == getattr(default, f.name), f.name


# --- properties --------------------------------------------------------------------------------

_KEYS = sorted({f.name for cls in ALL_CLASSES for f in dataclasses.fields(cls)} | {"header", "query", "cookie", "<<"})
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["${A}", "${A:-x}", "$$", "${", "5s", "1MiB", "http://h:1", "redis://h", "a", "fly", "dns"])
)  # fmt: skip
_DATA = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_duration_and_size_only_raise_config_error(text: str) -> None:
    for parse in (parse_duration, parse_size):
        try:
            parse(text, "k")
        except ConfigError as err:
            assert str(err).startswith("k: ")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(), st.floats(), st.text(max_size=30)))
def test_parse_hostport_only_raises_config_error(value: Any) -> None:
    try:
        host, port = parse_hostport(value, "listen")
    except ConfigError as err:
        assert str(err).startswith("listen: ")
    else:
        assert 0 <= port <= 65535 and host


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), _DATA, max_size=6),
    st.sampled_from([{}, {"A": "1"}, {"FLY_MACHINE_ID": "m1", "LOG_LEVEL": "x"}]),
)
def test_config_from_mapping_only_raises_config_error(data: dict[Any, Any], environ: dict[str, str]) -> None:
    try:
        config = config_from_mapping(data, environ)
    except ConfigError:
        return
    assert isinstance(config, Config)
    json.dumps(config.redacted())


@settings(max_examples=200, deadline=None)
@given(_DATA)
def test_config_from_mapping_rejects_any_non_mapping(data: Any) -> None:
    if isinstance(data, dict):
        return
    with pytest.raises(ConfigError):
        config_from_mapping(data, {})
