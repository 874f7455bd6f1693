"""``tests/functional/test_hot_path.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_hot_path import *  # noqa: F403
