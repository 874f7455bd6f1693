"""``tests/robustness/test_slow_clients.py`` on the aiohttp engine (see ``tests/aiohttp_engine/conftest.py``)."""

from tests.robustness.test_slow_clients import *  # noqa: F403
