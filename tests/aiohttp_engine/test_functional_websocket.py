"""``tests/functional/test_websocket.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_websocket import *  # noqa: F403
