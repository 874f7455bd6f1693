"""``tests/functional/test_reload.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_reload import *  # noqa: F403
