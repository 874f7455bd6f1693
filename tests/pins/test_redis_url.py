"""``redis+cluster://`` and ``redis+sentinel://`` URLs: what is accepted, and a clear error (naming
``store.url``, never echoing a password) for every malformed one."""

from __future__ import annotations

import pytest

from affinity_proxy.config import config_from_mapping
from affinity_proxy.config.parse import ConfigError
from affinity_proxy.pins.redis import describe_url
from affinity_proxy.pins.redis_url import RedisTarget, parse_distributed_url

BASE = {"instances": [{"id": "a", "url": "http://127.0.0.1:9000"}]}


@pytest.mark.parametrize(("url", "target"), [
    ("redis+cluster://10.0.0.1:7000", RedisTarget("redis+cluster", (("10.0.0.1", 7000),))),
    ("redis+cluster://a:7000,b.example:7001/", RedisTarget("redis+cluster", (("a", 7000), ("b.example", 7001)))),
    ("redis+cluster://:s%40cret@[::1]:7000/0", RedisTarget("redis+cluster", (("::1", 7000),), None, "s@cret")),
    ("redis+sentinel://s1:26379,s2:26379/mymaster",
     RedisTarget("redis+sentinel", (("s1", 26379), ("s2", 26379)), master="mymaster")),
    ("redis+sentinel://u:pw@s1:26379/main.pins/3",
     RedisTarget("redis+sentinel", (("s1", 26379),), "u", "pw", "main.pins", 3)),
])  # fmt: skip
def test_accepted(url: str, target: RedisTarget) -> None:
    assert parse_distributed_url(url) == target
    config = config_from_mapping({"store": {"url": url}, **BASE})
    assert config.store.url == url and config.store.kind == "redis"


def test_describe_url_hides_credentials() -> None:
    assert describe_url("redis+cluster://:pw@a:1,b:2") == "redis+cluster://a:1,b:2"
    assert describe_url("redis+sentinel://u:pw@s:26379/m/1") == "redis+sentinel://s:26379/m"


@pytest.mark.parametrize(("url", "problem"), [
    ("redis+cluster://", "every host needs host:port"),
    ("redis+cluster://a", "every host needs host:port"),
    ("redis+cluster://a:0", "port in 1-65535"),
    ("redis+cluster://a:70000", "port in 1-65535"),
    ("redis+cluster://a:1,,b:2", "every host needs host:port"),
    ("redis+cluster://a:x", "every host needs host:port"),
    ("redis+cluster://a:1/3", "a Redis Cluster has no database numbers"),
    ("redis+cluster://a:1/mymaster", "a Redis Cluster has no database numbers"),
    ("redis+cluster://a:1?x=1", "is not a valid URL"),
    ("redis+sentinel://s:26379", "must name the master"),
    ("redis+sentinel://s:26379/", "must name the master"),
    ("redis+sentinel://s:26379/m/x", "the database after the master name must be a number"),
    ("redis+sentinel://s:26379/m/1/2", "must name the master"),
    ("redis+sentinel://s:26379/bad name", "must name the master"),
    ("redis+sentinel://:hunter2@s/m", "every host needs host:port"),
])  # fmt: skip
def test_rejected_with_a_clear_error(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_distributed_url(url)
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"store": {"url": url}, **BASE})
    assert str(info.value).startswith("store.url: ") and problem in str(info.value)
    assert "hunter2" not in str(info.value)


def test_other_schemes_are_not_distributed() -> None:
    with pytest.raises(ValueError, match="scheme must be one of redis\\+cluster, redis\\+sentinel"):
        parse_distributed_url("redis://h:6379")
