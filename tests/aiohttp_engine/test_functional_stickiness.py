"""``tests/functional/test_stickiness.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_stickiness import *  # noqa: F403
