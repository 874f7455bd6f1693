"""Every functional and robustness test module also runs on the aiohttp engine (a twin module here
re-exports its tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from affinity_proxy.config import Config
from affinity_proxy.serve.app import ProxyServer
from tests.functional.conftest import make_config
from tests.functional.helpers import base

TESTS = Path(__file__).resolve().parents[1]
TWINS = [
    ("functional", TESTS / "aiohttp_engine", "test_functional_"),
    ("robustness", TESTS / "aiohttp_engine" / "robustness", "test_robustness_"),
]


@pytest.mark.parametrize(("suite", "where", "prefix"), TWINS, ids=[t[0] for t in TWINS])
def test_every_module_has_an_aiohttp_engine_twin(suite: str, where: Path, prefix: str) -> None:
    originals = {p.stem.removeprefix("test_") for p in (TESTS / suite).glob("test_*.py")}
    twins = {p.stem.removeprefix(prefix) for p in where.glob(f"{prefix}*.py")}
    assert originals <= twins, f"add {where.relative_to(TESTS)}/{prefix}<name>.py for: {sorted(originals - twins)}"
    for name in originals:
        assert f"from tests.{suite}.test_{name} import *" in (where / f"{prefix}{name}.py").read_text()


async def test_proxies_started_here_run_on_the_aiohttp_engine(backends, start_proxy, http) -> None:  # type: ignore[no-untyped-def]
    """The default engine is fast; the fixtures of this package must really switch it."""
    assert Config().engine == "fast"
    via_fixture = await start_proxy(make_config(backends))
    built = ProxyServer(make_config(backends))  # built directly, as the fly cluster does
    assert (via_fixture.config.engine, built.config.engine) == ("aiohttp", "aiohttp")
    async with http.get(base(via_fixture) + "/") as resp:
        assert resp.status == 200
