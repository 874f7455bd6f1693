"""``tests/robustness/test_security.py`` on the aiohttp engine (see ``tests/aiohttp_engine/conftest.py``)."""

from tests.robustness.test_security import *  # noqa: F403
