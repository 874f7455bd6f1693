"""Functional fixtures. Every test here runs once per engine (the autouse ``engine`` fixture,
``tests/support/engine.py``) against real demo backends and real proxies (``backends``,
``start_proxy`` and ``http`` are in ``tests/conftest.py``)."""

# `serve --workers N` subprocess fixtures, shared by the worker and multi-node process tests.
from tests.functional.test_workers import fresh_connections, start_serve  # noqa: F401
from tests.support.engine import every_engine  # noqa: F401  (the autouse `engine` fixture)
