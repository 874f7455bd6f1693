"""The proxy in fly mode behind the local Fly edge. Every test here runs once per engine (the
autouse ``engine`` fixture, ``tests/support/engine.py``); ``http`` is in ``tests/conftest.py``."""

from tests.support.engine import every_engine  # noqa: F401  (the autouse `engine` fixture)
from tests.support.fly_machines import start_edge, start_machine  # noqa: F401  (fixtures)
