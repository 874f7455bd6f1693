"""``tests/robustness/test_non_reading_clients.py`` on the aiohttp engine (see ``tests/aiohttp_engine/conftest.py``)."""

from tests.robustness.test_non_reading_clients import *  # noqa: F403
