"""``tests/fly/test_fly_mode.py`` on the aiohttp engine (see this package's conftest)."""

from tests.fly.test_fly_mode import *  # noqa: F403
