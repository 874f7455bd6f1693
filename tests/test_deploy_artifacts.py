"""The deployment files say what the README promises: fly.toml runs the proxy in fly mode in front of
an app, checks /_affinity/health, exposes metrics, and gives the proxy time to drain; the compose
example's proxy config loads and names the compose file's own services."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

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
                                                               "FLY_APP_NAME": "my-affinity-app",
                                                               "COOKIE_SECRET": "s", "ADMIN_TOKEN": "t",
                                                               "REDIS_URL": "redis://redis.internal:6379/0"})
    assert config.mode == "fly" and config.listen_port == 8080 and config.admin_port == 9091
    assert parse_duration(doc["kill_timeout"], "kill_timeout") > config.limits.client_timeout


def test_dockerfiles_run_as_non_root() -> None:
    for path in ("Dockerfile", "examples/fly/Dockerfile"):
        lines = [line.strip() for line in (ROOT / path).read_text().splitlines()]
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), path


def test_docker_compose_example_runs_the_proxy_on_its_services() -> None:
    """examples/docker-compose.yml: the proxy's mounted config exists, loads with the two secrets
    the compose file requires, and names exactly the compose file's Redis and app services (port
    and instance id as each app's command line gives them)."""
    compose = yaml.safe_load((ROOT / "examples" / "docker-compose.yml").read_text())
    services = compose["services"]
    proxy = services["proxy"]
    [volume] = proxy["volumes"]
    source, target, mode = volume.split(":")
    assert mode == "ro" and proxy["command"] == ["serve", "--config", target]
    config_path = (ROOT / "examples" / source).resolve()
    assert config_path.parent == ROOT / "examples" and config_path.name != "compose.yaml"  # compose's own name
    secrets = {name: "x" * 32 for name in proxy["environment"]}
    assert set(secrets) == {"COOKIE_SECRET", "ADMIN_TOKEN"}
    config = load_config(config_path, environ=secrets)
    assert config.store.url == "redis://redis:6379/0" and "redis" in services
    assert config.admin.token and config.cookie.secret
    apps = {}
    for name, service in services.items():
        argv = service.get("entrypoint") or []
        if argv[1:3] == ["-m", "affinity_proxy.demo.backend"]:
            apps[argv[argv.index("--id") + 1]] = f"http://{name}:{argv[argv.index('--port') + 1]}"
    assert {i.id: i.url for i in config.instances} == apps
    assert set(proxy["depends_on"]) == {"redis", *(name for name in services if name.startswith("app-"))}
    ports = {p.split(":")[-1] for p in proxy["ports"]}
    assert ports == {str(config.listen_port), str(config.admin_port)}
