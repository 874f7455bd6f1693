"""``tests/robustness/test_request_bodies.py`` on the aiohttp engine (see ``tests/aiohttp_engine/conftest.py``)."""

from tests.robustness.test_request_bodies import *  # noqa: F403
