"""``tests/functional/test_streaming.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_streaming import *  # noqa: F403
