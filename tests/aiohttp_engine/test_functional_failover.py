"""``tests/functional/test_failover.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_failover import *  # noqa: F403
