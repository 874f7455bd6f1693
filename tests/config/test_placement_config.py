"""``placement`` config (issue #14): defaults, the off switch for bounded load, and the errors
``config check`` reports with their key paths."""

from __future__ import annotations

from typing import Any

import pytest

from affinity_proxy.config import Config, ConfigError, PlacementConfig, RebalanceConfig, config_from_mapping

ONE = [{"id": "a", "url": "http://127.0.0.1:9001"}]


def load(placement: Any, environ: dict[str, str] | None = None) -> PlacementConfig:
    return config_from_mapping({"instances": ONE, "placement": placement}, environ or {}).placement


def test_defaults() -> None:
    assert Config().placement == PlacementConfig(1.25, RebalanceConfig(False, 600.0, 600))
    assert load(None) == load({}) == Config().placement


@pytest.mark.parametrize("off", [0, 0.0, None])
def test_zero_or_null_turns_bounded_load_off(off: Any) -> None:
    assert load({"load_factor": off}).load_factor is None


def test_values_are_read() -> None:
    got = load({"load_factor": 2, "rebalance": {"enabled": True, "idle_after": "5s", "max_moves_per_minute": 60}})
    assert got == PlacementConfig(2.0, RebalanceConfig(True, 5.0, 60))


def test_environment_text_is_read_as_a_number() -> None:
    assert load({"load_factor": "${LF}"}, {"LF": "1.5"}).load_factor == 1.5


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"load_factor": 0.5}, r"^placement\.load_factor: must be 0 \(off\) or between 1 and 100, got 0\.5$"),
        ({"load_factor": "x"}, r"^placement\.load_factor: expected a number, got 'x'$"),
        ({"load_factor": True}, r"^placement\.load_factor: expected a number"),
        ({"load_factor": float("nan")}, r"^placement\.load_factor: expected a number >= 1"),
        ({"rebalance": 5}, r"^placement\.rebalance: expected a mapping"),
        ({"rebalance": {"idle_afte": "1m"}},
         r"^placement\.rebalance\.idle_afte: unknown key .*did you mean idle_after\?$"),
        ({"rebalance": {"idle_after": 0}}, r"^placement\.rebalance\.idle_after: must be greater than 0"),
        ({"rebalance": {"max_moves_per_minute": 0}}, r"^placement\.rebalance\.max_moves_per_minute: must be between"),
        ({"rebalance": {"enabled": "yes"}}, r"^placement\.rebalance\.enabled: expected true or false"),
        ({"load_factr": 1}, r"^placement\.load_factr: unknown key .*did you mean load_factor\?$"),
    ],
)
def test_errors_name_the_key(placement: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(placement)
