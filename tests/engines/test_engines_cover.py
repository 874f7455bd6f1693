"""Every functional, fly and robustness test runs on both engines.

Replaces the twin stub modules of ``tests/aiohttp_engine``: the suites collect each test once per
engine through the autouse ``engine`` fixture (``tests/support/engine.py``), so this collects them
(``pytest --collect-only`` in a subprocess, as a developer would) and checks that every test id
appears exactly once with each engine in its brackets, ``test_x[fast]`` and ``test_x[aiohttp]``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from affinity_proxy.config import Config
from tests.support.engine import ENGINES

ROOT = Path(__file__).resolve().parents[2]
SUITES = ("tests/functional", "tests/fly", "tests/robustness")
ENGINE_ID = re.compile(r"\[(?:(.*)-)?(" + "|".join(ENGINES) + r")(?:-(.*))?\]$")


def collected(*paths: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_engine_fixture_names_every_engine() -> None:
    assert sorted(ENGINES) == sorted(Config.ENGINES)
    assert ENGINES[0] == Config().engine, "the default engine runs first"


def test_every_functional_fly_and_robustness_test_runs_on_both_engines() -> None:
    ids = collected(*SUITES)
    assert len(ids) > 300, f"only {len(ids)} tests collected from {SUITES}"
    engines_of: dict[str, list[str]] = defaultdict(list)
    for node_id in ids:
        found = ENGINE_ID.search(node_id)
        assert found, f"{node_id} does not name an engine: its suite's conftest must import the engine fixture"
        rest = "-".join(part for part in (found.group(1), found.group(3)) if part)
        test = node_id[: found.start()] + (f"[{rest}]" if rest else "")
        engines_of[test].append(found.group(2))
    missing = {test: got for test, got in engines_of.items() if sorted(got) != sorted(ENGINES)}
    assert not missing, f"tests not collected exactly once per engine: {missing}"
    assert {path.split("/")[1] for path in engines_of} == {suite.split("/")[1] for suite in SUITES}


def test_no_twin_modules_are_left() -> None:
    """The engines are a fixture parameter, not a copy of the suite (``tests/aiohttp_engine`` is gone)."""
    assert not (ROOT / "tests" / "aiohttp_engine").exists()
    star = re.compile(r"^from tests\.\S+ import \*", re.M)
    stubs = [p for p in (ROOT / "tests").rglob("test_*.py") if star.search(p.read_text())]
    assert stubs == []
