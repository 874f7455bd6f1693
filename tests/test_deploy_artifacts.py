"""The deployment files say what the README promises: fly.toml runs the proxy in fly mode in front of
an app, checks /_affinity/health, exposes metrics, and gives the proxy time to drain; the compose
example's proxy config loads and names the compose file's own services."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from affinity_proxy.config import load_config, parse_duration
from affinity_proxy.serve.runtime import shutdown_budget

ROOT = Path(__file__).resolve().parents[1]


FLY_ENV = {"FLY_MACHINE_ID": "148e9e3c0e4d78", "FLY_APP_NAME": "my-affinity-app", "COOKIE_SECRET": "s" * 32,
           "ADMIN_TOKEN": "t" * 32, "REDIS_URL": "redis://redis.internal:6379/0"}
#: Fly's largest kill_timeout (docs/fly-protocol.md section 5).
FLY_MAX_KILL_TIMEOUT = 300.0


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        name, _, args = line.partition(" ")
        out.append((name.upper(), args.strip()))
    return out


def _words(args: str) -> list[str]:
    """An instruction's words, JSON (exec) form or shell form."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copies(path: Path) -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of each COPY/ADD from the build context (not ``--from`` a stage)."""
    out = []
    for name, args in dockerfile_instructions(path):
        if name not in ("COPY", "ADD"):
            continue
        words = _words(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        rest = [w for w in words if not w.startswith("--")]
        out.append((rest[:-1], rest[-1]))
    return out


def dockerignore(context: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore`` of ``context`` as ``(exception, regex)`` rules, Docker's syntax: Go's
    filepath.Match (``*`` stops at ``/``) plus ``**`` for any number of directories, ``!`` for an
    exception, a leading ``/`` ignored."""
    rules = []
    for raw in (context / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().lstrip("/").rstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``relative`` (a path in the context) out: the last rule matching it or
    one of its parent directories decides."""
    parts = relative.strip("/").split("/")
    verdict = False
    for negate, regex in rules:
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            verdict = not negate
    return verdict


def fly_deploy_command(readme: Path) -> list[str]:
    """The ``fly deploy ...`` line of a README's code block, as argv."""
    lines = [line.strip() for line in readme.read_text().splitlines() if line.strip().startswith("fly deploy")]
    assert len(lines) == 1, f"{readme}: expected one fly deploy command, found {lines}"
    return shlex.split(lines[0])


#: (fly.toml, the Dockerfile it builds, the build context, as each one's README says to deploy)
DEPLOYS = [
    ("fly.toml", "Dockerfile", "."),  # `fly deploy` at the repository root
    ("examples/fly/fly.toml", "examples/fly/Dockerfile", "."),  # examples/fly/README.md: from the repository root
]


def serve_argv(toml: dict[str, Any], dockerfile: Path) -> list[str]:
    """The command the Machine runs: the http service's process from fly.toml, else the image's CMD."""
    processes = toml.get("processes", {})
    groups = toml["http_service"].get("processes") or list(processes)
    if groups:
        return shlex.split(processes[groups[0]])
    cmds = [_words(args) for name, args in dockerfile_instructions(dockerfile) if name == "CMD"]
    argv = cmds[-1]
    return argv[1:] if argv[0] == "affinity-proxy" else argv


def config_in_image(path_in_image: str, dockerfile: Path) -> Path:
    """The repository file the image holds at ``path_in_image`` (found through its COPY lines)."""
    for sources, destination in copies(dockerfile):
        for source in sources:
            dest = destination.rstrip("/")
            if path_in_image == dest or (len(sources) == 1 and path_in_image.startswith(dest + "/")):
                tail = path_in_image[len(dest):].lstrip("/")
                return ROOT / source / tail if tail else ROOT / source
    raise AssertionError(f"{path_in_image} is not copied into the image by {dockerfile}")


@pytest.mark.parametrize(("toml_path", "dockerfile", "context"), DEPLOYS)
def test_kill_timeout_covers_the_longest_graceful_stop(toml_path: str, dockerfile: str, context: str) -> None:
    """Fly SIGKILLs a Machine ``kill_timeout`` after ``kill_signal`` (deploys, autostop): it must
    cover the proxy's longest graceful stop with the config the Machine runs (both drains of
    ``limits.client_timeout``, WebSocket closes, the pin flush, the admin listener, then the
    supervised app's SIGTERM grace: ``runtime.shutdown_budget``), within Fly's 300 s maximum."""
    toml = tomllib.loads((ROOT / toml_path).read_text())
    argv = serve_argv(toml, ROOT / dockerfile)
    assert argv[0] == "serve"
    workers = argv[argv.index("--workers") + 1] if "--workers" in argv else "1"
    assert workers == "1", "shutdown_budget is the one-process stop"
    config_path = config_in_image(argv[argv.index("--config") + 1], ROOT / dockerfile)
    config = load_config(config_path, environ=FLY_ENV)
    budget = shutdown_budget(config, supervised_app="--exec" in argv)
    kill_timeout = parse_duration(toml["kill_timeout"], "kill_timeout")
    print(f"\n{toml_path}: kill_timeout {kill_timeout:g}s, longest graceful stop {budget:g}s "
          f"({config_path.relative_to(ROOT)}: client_timeout {config.limits.client_timeout:g}s, "
          f"upstream_timeout {config.limits.upstream_timeout:g}s, engine {config.engine})")
    assert budget <= kill_timeout <= FLY_MAX_KILL_TIMEOUT
    assert config.limits.client_timeout >= config.limits.upstream_timeout, (
        "a request waiting on the app for upstream_timeout must be able to finish within the drain")
    assert toml["kill_signal"] == "SIGTERM"


@pytest.mark.parametrize(
    ("client_timeout", "engine", "exec_app", "expected"),
    [(60.0, "fast", True, 60 + 60 + 10 + 0.25 + 3 + 5 + 60), (60.0, "aiohttp", True, 60 + 10 + 0.25 + 3 + 5 + 60),
     (30.0, "fast", False, 30 + 30 + 10 + 0.25 + 3 + 5)],
)  # fmt: skip
def test_shutdown_budget_adds_up_the_stages(client_timeout: float, engine: str, exec_app: bool,
                                            expected: float) -> None:
    config = load_config(ROOT / "config" / "fly.yaml", environ=FLY_ENV)
    config = replace(config, engine=engine, limits=replace(config.limits, client_timeout=client_timeout))
    assert shutdown_budget(config, supervised_app=exec_app) == pytest.approx(expected)


@pytest.mark.parametrize(("toml_path", "dockerfile", "context"), DEPLOYS)
def test_every_copy_source_is_in_the_build_context(toml_path: str, dockerfile: str, context: str) -> None:
    """``fly deploy`` sends its working directory as the build context and builds the Dockerfile
    named by ``[build] dockerfile`` (relative to fly.toml): every COPY source must be there and not
    left out by the context's ``.dockerignore``."""
    toml = tomllib.loads((ROOT / toml_path).read_text())
    assert (ROOT / toml_path).parent / toml["build"]["dockerfile"] == ROOT / dockerfile
    root = (ROOT / context).resolve()
    rules = dockerignore(root)
    found = copies(ROOT / dockerfile)
    assert found, "the image copies something from the context"
    for sources, _destination in found:
        for source in sources:
            path = root / source
            assert path.exists(), f"{dockerfile}: COPY {source} is not in the build context {root}"
            assert not ignored(source, rules), f"{dockerfile}: COPY {source} is left out by .dockerignore"
            if path.is_dir():
                kept = [p for p in path.rglob("*") if p.is_file() and not ignored(str(p.relative_to(root)), rules)]
                assert kept, f"{dockerfile}: COPY {source} would copy no file"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    rules = dockerignore(ROOT)
    for path in (".venv/bin/python", ".git/HEAD", ".pytest_cache/v/x", ".ruff_cache/x", ".hypothesis/x",
                 "affinity_proxy/__pycache__/app.cpython-311.pyc", "affinity_proxy.egg-info/PKG-INFO",
                 "tests/test_config.py", "tests/.pytest_cache/x", "affinity_proxy/proxy/x.pyc", ".env", "config/.env"):
        assert ignored(path, rules), path
    for path in ("pyproject.toml", "README.md", "affinity_proxy/serve/app.py",
                 "affinity_proxy/admin/static/dashboard.js", "config/fly.yaml", "examples/fly/affinity.yaml"):
        assert not ignored(path, rules), path


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [("build", "build/x", True), ("build", "a/build", False), ("**/build", "a/build/x", True),
     ("*.md", "README.md", True), ("*.md", "docs/x.md", False), ("**/*.md", "docs/x.md", True),
     ("docs\n!docs/keep.md", "docs/keep.md", False), ("docs\n!docs/keep.md", "docs/other.md", True),
     ("/tests/", "tests/a.py", True), ("te?ts", "tests", True), ("[a-c]x", "bx", True)],
)  # fmt: skip
def test_the_dockerignore_reader(tmp_path: Path, patterns: str, path: str, expected: bool) -> None:
    (tmp_path / ".dockerignore").write_text("# comment\n\n" + patterns + "\n")
    assert ignored(path, dockerignore(tmp_path)) is expected


def test_the_example_readme_deploys_from_the_build_context() -> None:
    """examples/fly/README.md's deploy command, run where it says (the repository root), names the
    example's fly.toml and Dockerfile and the build context every COPY needs."""
    readme = (ROOT / "examples" / "fly" / "README.md").read_text()
    assert "from the repository root" in readme
    argv = fly_deploy_command(ROOT / "examples" / "fly" / "README.md")
    config = argv[argv.index("--config") + 1]
    assert config == "examples/fly/fly.toml" and (ROOT / config).is_file()
    dockerfile = argv[argv.index("--dockerfile") + 1]
    assert dockerfile == "examples/fly/Dockerfile" and (ROOT / dockerfile).is_file()
    positional = [w for i, w in enumerate(argv[2:], 2) if not w.startswith("-") and not argv[i - 1].startswith("--")]
    assert positional == ["."], "the working directory (the build context) is the repository root"
    for sources, _ in copies(ROOT / dockerfile):
        assert all((ROOT / s).exists() for s in sources)


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
    assert parse_duration(doc["kill_timeout"], "kill_timeout") > config.limits.client_timeout  # see below for all of it


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
        if argv[1:3] == ["-m", "affinity_proxy.devtools.demo.backend"]:
            apps[argv[argv.index("--id") + 1]] = f"http://{name}:{argv[argv.index('--port') + 1]}"
    assert {i.id: i.url for i in config.instances} == apps
    assert set(proxy["depends_on"]) == {"redis", *(name for name in services if name.startswith("app-"))}
    ports = {p.split(":")[-1] for p in proxy["ports"]}
    assert ports == {str(config.listen_port), str(config.admin_port)}
