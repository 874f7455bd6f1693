"""``tests/robustness/test_fuzz_parsers.py`` on the aiohttp engine (see ``tests/aiohttp_engine/conftest.py``)."""

from tests.robustness.test_fuzz_parsers import *  # noqa: F403
