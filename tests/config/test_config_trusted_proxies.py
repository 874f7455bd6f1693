"""``trusted_proxies``: parsing, errors with key paths, the mode defaults and ``config check``."""

from __future__ import annotations

from typing import Any

import pytest

from affinity_proxy.config import FLY_EDGE_PROXIES, Config, ConfigError, config_from_mapping

BASE: dict[str, Any] = {"instances": [{"id": "a", "url": "http://127.0.0.1:9000"}]}


def load(**extra: Any) -> Config:
    return config_from_mapping({**BASE, **extra}, {})


def test_defaults_depend_on_the_mode() -> None:
    assert load().trusted_proxies is None and load().trusted_proxy_cidrs == ()
    fly = Config(mode="fly")
    assert fly.trusted_proxy_cidrs == FLY_EDGE_PROXIES == ("172.16.0.0/12",)
    assert Config(mode="fly", trusted_proxies=()).trusted_proxy_cidrs == ()  # [] trusts nobody, even on Fly


def test_addresses_and_cidrs_of_both_families_are_normalised() -> None:
    config = load(trusted_proxies=["10.0.0.0/8", "192.0.2.7", " fd00::/8 ", "2001:DB8::1", "::1"])
    assert config.trusted_proxy_cidrs == ("10.0.0.0/8", "192.0.2.7/32", "fd00::/8", "2001:db8::1/128", "::1/128")


def test_null_means_the_mode_default() -> None:
    assert load(trusted_proxies=None).trusted_proxies is None


@pytest.mark.parametrize(("value", "message"), [
    (["10.0.0.1/8"], "trusted_proxies[0]: expected an IP address or a CIDR"),  # host bits set
    (["10.0.0.0/33"], "trusted_proxies[0]: expected an IP address or a CIDR"),
    (["fly.io"], "trusted_proxies[0]: expected an IP address or a CIDR"),
    (["10.0.0.0/8", "nope"], "trusted_proxies[1]: expected an IP address or a CIDR"),
    ([""], "trusted_proxies[0]: expected a non-empty string"),
    ([8], "trusted_proxies[0]: expected a string"),
    ("10.0.0.0/8", "trusted_proxies: expected a list"),
    ({"a": 1}, "trusted_proxies: expected a list"),
])
def test_bad_values_name_the_key(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(trusted_proxies=value)
    assert str(err.value).startswith(message), str(err.value)


def test_built_in_code_values_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"trusted_proxies\[0\]"):
        Config(trusted_proxies=("not-a-network",))


def test_config_check_shows_the_effective_list() -> None:
    assert load().redacted()["trusted_proxies"] == []
    assert Config(mode="fly").redacted()["trusted_proxies"] == ["172.16.0.0/12"]
    assert load(trusted_proxies=["10.0.0.0/8"]).redacted()["trusted_proxies"] == ["10.0.0.0/8"]
