"""No shipped file holds a usable secret, and every shipped config refuses to serve without its own.

Scans config/, examples/, the Dockerfiles, fly.toml files and README code blocks for a secret with a
fallback (``${COOKIE_SECRET:-x}``, ``${ADMIN_TOKEN:-x}``, a password in a store URL default) or a
literal secret value, then runs ``affinity-proxy serve --config`` on every shipped config (and on
the one each Dockerfile / fly.toml starts) without the variables: exit 2 and one line naming them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from affinity_proxy.config import SECRET_PATHS

ROOT = Path(__file__).resolve().parents[1]


def _is_proxy_config(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "cookie" in data


#: Every proxy config shipped (config/*.yaml, examples/**: the ones with a cookie section).
SHIPPED_CONFIGS = sorted(p for p in [*ROOT.glob("config/*.yaml"), *ROOT.glob("examples/**/*.yaml")]
                         if _is_proxy_config(p))
#: Every text file a user copies from: configs, compose files, Dockerfiles, fly.toml, README.
SCANNED = sorted({*ROOT.glob("config/**/*"), *ROOT.glob("examples/**/*"), *ROOT.glob("**/Dockerfile"),
                  *ROOT.glob("**/fly.toml"), *ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md")}
                 - {*ROOT.glob(".venv/**/*"), *ROOT.glob("examples/grafana/*.json")})
SECRET_WORDS = r"(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|CREDENTIAL)"
#: ``${...SECRET...:-x}`` with a non-empty fallback, in YAML, shell or compose syntax.
SECRET_FALLBACK = re.compile(r"\$\{[A-Z0-9_]*" + SECRET_WORDS + r"[A-Z0-9_]*:?[-=]([^}]+)\}", re.I)
#: A default store URL that carries a password: ``${REDIS_URL:-redis://:pw@host}``.
URL_PASSWORD_FALLBACK = re.compile(r"\$\{[A-Z0-9_]+:-[a-z+]+://[^}@/]*:[^}@/]+@", re.I)
#: ``KEY: value`` / ``KEY=value`` for a secret-looking key with a literal value (not ${...}, not a placeholder).
LITERAL_SECRET = re.compile(r"^\s*-?\s*[\"']?([A-Z0-9_]*" + SECRET_WORDS + r")[\"']?\s*[:=]\s*(.+?)\s*$", re.I | re.M)
ALLOWED_LITERALS = re.compile(
    r"^(?:\$\{[^}]*\}|\$[A-Z_]+|null|~|\[\]|\"\"|''|true|false|\*\*\*|YOUR_[A-Z_]+|<[^>]+>"
    r"|\$\(openssl rand -hex \d+\).*)(?:\s*#.*)?$", re.I)


def _text(path: Path) -> str | None:
    if not path.is_file() or path.stat().st_size > 2_000_000:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def _readme_code(text: str, path: Path) -> str:
    """Markdown files: only their fenced code blocks (prose may mention ${COOKIE_SECRET:-...} as a bad example)."""
    if path.suffix != ".md":
        return text
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S))


def test_the_scan_covers_what_users_copy() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SCANNED}
    assert {p.relative_to(ROOT).as_posix() for p in SHIPPED_CONFIGS} >= {
        "config/proxy.yaml", "config/fly.yaml", "config/minimal.yaml", "config/redis.yaml",
        "examples/fly/affinity.yaml", "examples/compose-proxy.yaml"}
    assert {"config/proxy.yaml", "config/fly.yaml", "config/minimal.yaml", "config/redis.yaml", "Dockerfile",
            "fly.toml", "examples/fly/affinity.yaml", "examples/docker-compose.yml", "README.md"} <= names


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_shipped_file_holds_a_secret(path: Path) -> None:
    text = _text(path)
    if text is None:
        return
    code = _readme_code(text, path)
    assert not SECRET_FALLBACK.findall(code), f"{path}: a secret with a fallback value"
    assert not URL_PASSWORD_FALLBACK.search(code), f"{path}: a default URL with a password"
    for match in LITERAL_SECRET.finditer(code):
        key, value = match.group(1), match.group(2).rstrip(",")
        assert ALLOWED_LITERALS.match(value) or value.startswith(("${", "\"${")), f"{path}: {key} = {value!r}"


@pytest.mark.parametrize("sample", [
    "  secret: ${COOKIE_SECRET:-dev-secret-change-me}", "  token: ${ADMIN_TOKEN:-change-me-admin-token}",
    "token: ${FLY_API_TOKEN-x}", "url: ${REDIS_URL:-redis://:change-me@redis:6379/0}",
    "      COOKIE_SECRET: change-me-to-a-long-random-string", "ADMIN_TOKEN=hunter2",
])  # fmt: skip
def test_the_scan_finds_what_the_old_configs_shipped(sample: str) -> None:
    assert (SECRET_FALLBACK.search(sample) or URL_PASSWORD_FALLBACK.search(sample)
            or any(not ALLOWED_LITERALS.match(m.group(2)) for m in LITERAL_SECRET.finditer(sample)))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_secret_keys_of_shipped_configs_come_from_the_environment_without_default(path: Path) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    for dotted in SECRET_PATHS:
        section, key = dotted.split(".")
        value = (data.get(section) or {}).get(key)
        for item in value if isinstance(value, list) else [value]:
            assert item is None or re.fullmatch(r"\$\{[A-Z0-9_]+\}", str(item)), f"{path}: {dotted} = {item!r}"


def _deploy_configs() -> dict[str, Path]:
    """The config each Dockerfile / fly.toml starts, mapped back to the file in this repository."""
    out: dict[str, Path] = {}
    cmd = re.search(r"^CMD\s+(\[.*?\])\s*$", (ROOT / "Dockerfile").read_text(), re.M | re.S)
    assert cmd is not None
    argv = yaml.safe_load(cmd.group(1))
    out["Dockerfile"] = ROOT / "config" / Path(argv[argv.index("--config") + 1]).name
    fly = shlex.split(tomllib.loads((ROOT / "fly.toml").read_text())["processes"]["app"])
    out["fly.toml"] = ROOT / "config" / Path(fly[fly.index("--config") + 1]).name
    example = (ROOT / "examples" / "fly" / "Dockerfile").read_text()
    assert "COPY examples/fly/affinity.yaml /app/affinity.yaml" in example and "/app/affinity.yaml" in example
    out["examples/fly/Dockerfile"] = ROOT / "examples" / "fly" / "affinity.yaml"
    return out


SERVE_CASES = {p.relative_to(ROOT).as_posix(): p for p in SHIPPED_CONFIGS}


@pytest.mark.parametrize("name", [*sorted(SERVE_CASES), "Dockerfile", "fly.toml", "examples/fly/Dockerfile"])
def test_serve_without_the_variables_exits_2_naming_them(name: str, tmp_path: Path) -> None:
    path = SERVE_CASES.get(name) or _deploy_configs()[name]
    needed = sorted(set(re.findall(r"\$\{([A-Z0-9_]+)\}", yaml.safe_dump(yaml.safe_load(path.read_text())))))
    assert "COOKIE_SECRET" in needed, path
    env = {k: v for k, v in os.environ.items()
           if k not in needed and not k.startswith(("FLY_", "AFFINITY_"))} | {"FLY_MACHINE_ID": "148e9e3c0e4d78"}
    proc = subprocess.run([sys.executable, "-m", "affinity_proxy", "serve", "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    for variable in needed:
        assert variable in proc.stderr, (variable, proc.stderr)
    assert "environment variable" in proc.stderr and proc.stdout == ""


def test_demo_generates_its_own_secret_and_says_so() -> None:
    from affinity_proxy.devtools.demo.runner import _banner, demo_config

    first, second = demo_config([9001], 0, 0), demo_config([9001], 0, 0)
    assert first.cookie.secret and len(first.cookie.secret) >= 32 and first.cookie.secret != second.cookie.secret
    assert first.admin_on_loopback and first.admin.token is None
    first.require_cookie_secret()
    first.require_admin_token()
    assert "cookie secret was generated for this run" in " ".join(_banner(8080, 8081, ["alpha"]).split())
