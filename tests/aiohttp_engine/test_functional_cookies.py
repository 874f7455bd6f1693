"""``tests/functional/test_cookies.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_cookies import *  # noqa: F403
