"""``tests/functional/test_redis_nodes.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_redis_nodes import *  # noqa: F403
