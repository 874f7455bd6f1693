"""The deployment files say what the README promises: fly.toml runs the proxy in fly mode in front of
an app, checks /_affinity/health, exposes metrics, and gives the proxy time to drain."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

from affinity_proxy.config import load_config, parse_duration

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["fly.toml", "examples/fly/fly.toml"])
def test_fly_toml_deploys_the_proxy_in_front_of_the_app(path: str) -> None:
    doc = tomllib.loads((ROOT / path).read_text())
    service = doc["http_service"]
    assert service["internal_port"] == 8080
    assert [c["path"] for c in service["checks"]] == ["/_affinity/health"]
    assert doc["metrics"][0]["port"] == 9091 and doc["metrics"][0]["path"] == "/metrics"
    assert doc["kill_signal"] == "SIGTERM"
    assert parse_duration(doc["kill_timeout"], "kill_timeout") > 30


def test_top_level_fly_toml_runs_fly_mode_with_exec() -> None:
    doc = tomllib.loads((ROOT / "fly.toml").read_text())
    argv = shlex.split(doc["processes"]["app"])
    assert argv[:3] == ["serve", "--config", "/app/config/fly.yaml"]
    assert "--exec" in argv
    config = load_config(ROOT / "config" / "fly.yaml", environ={"FLY_MACHINE_ID": "148e9e3c0e4d78",
                                                               "FLY_APP_NAME": "my-affinity-app"})
    assert config.mode == "fly" and config.listen_port == 8080 and config.admin_port == 9091
    assert parse_duration(doc["kill_timeout"], "kill_timeout") > config.limits.client_timeout


def test_dockerfiles_run_as_non_root() -> None:
    for path in ("Dockerfile", "examples/fly/Dockerfile"):
        lines = [line.strip() for line in (ROOT / path).read_text().splitlines()]
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), path
