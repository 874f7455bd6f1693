"""``tests/functional/test_distributed_stores.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_distributed_stores import *  # noqa: F403
