"""``tests/robustness/test_http_parsing.py`` on the aiohttp engine (see ``tests/aiohttp_engine/conftest.py``)."""

from tests.robustness.test_http_parsing import *  # noqa: F403
