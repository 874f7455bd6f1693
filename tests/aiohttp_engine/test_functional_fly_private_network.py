"""``tests/fly/test_private_network.py`` on the aiohttp engine (see this package's conftest)."""

from tests.fly.test_private_network import *  # noqa: F403
