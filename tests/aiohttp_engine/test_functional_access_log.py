"""``tests/functional/test_access_log.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_access_log import *  # noqa: F403
