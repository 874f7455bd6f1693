"""``tests/functional/test_forwarded_headers.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_forwarded_headers import *  # noqa: F403
