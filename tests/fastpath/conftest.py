"""The functional suite on the fast engine: every proxy a test starts runs with ``engine: fast``.

``tests/fastpath/test_functional_*.py`` re-export the test functions of ``tests/functional`` (and
``tests/fly/test_fly_mode.py``) so pytest runs them here too, with these fixtures:

- ``start_proxy`` (overriding the functional one) builds every ``ProxyServer`` with ``engine="fast"``;
- ``fast_engine`` (autouse) does the same for servers a test builds itself (the fly cluster), for
  configs re-read by a hot reload (the file on disk does not say ``engine``), and for
  ``affinity-proxy serve`` subprocesses, whose config file gets ``engine: fast`` appended before
  they start. It fails the test if a proxy ended up on the aiohttp engine anyway. Modules that
  set ``BOTH_ENGINES = True`` choose the engine of each server themselves.

The other functional fixtures (``backends``, ``http``, the ``serve`` subprocess ones) are the
functional suite's own, imported here.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

try:
    import httptools  # noqa: F401
except ImportError:  # engine: fast needs httptools (a dependency); without it there is nothing to run here
    collect_ignore_glob = ["test_*.py", "*/test_*.py"]

from affinity_proxy import reload as reload_module
from affinity_proxy.app import ProxyServer
from affinity_proxy.config import Config
from tests.functional.conftest import *  # noqa: F403  (its fixtures; start_proxy is replaced below)
from tests.functional.conftest import ProxyFactory


def _append_engine(argv: Any) -> None:
    """``affinity-proxy serve --config FILE``: make FILE say ``engine: fast`` (once)."""
    args = [str(a) for a in argv] if isinstance(argv, list | tuple) else []
    if "affinity_proxy" not in args or "serve" not in args or "--config" not in args:
        return
    path = Path(args[args.index("--config") + 1])
    text = path.read_text()
    if "\nengine:" not in "\n" + text:
        path.write_text(text.rstrip("\n") + "\nengine: fast\n")


@pytest.fixture(autouse=True)
def fast_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProxyServer]]:
    started: list[ProxyServer] = []
    if getattr(request.module, "BOTH_ENGINES", False):  # the module compares the engines itself
        yield started
        return
    real_init = ProxyServer.__init__

    def init(self: ProxyServer, config: Config, **kwargs: Any) -> None:
        real_init(self, replace(config, engine="fast"), **kwargs)
        started.append(self)

    real_load = reload_module.load_config

    def load_config(path: Any, *args: Any, **kwargs: Any) -> Config:
        return replace(real_load(path, *args, **kwargs), engine="fast")

    real_popen = subprocess.Popen

    class Popen(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            _append_engine(args)
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(ProxyServer, "__init__", init)
    monkeypatch.setattr(reload_module, "load_config", load_config)
    monkeypatch.setattr(subprocess, "Popen", Popen)
    yield started
    assert all(server.config.engine == "fast" for server in started)


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    servers: list[ProxyServer] = []

    async def factory(config: Config, **kwargs: object) -> ProxyServer:
        server = ProxyServer(replace(config, engine="fast"), **kwargs)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop()
