"""``tests/functional/test_workers.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_workers import *  # noqa: F403
