"""``tests/functional/test_shared_state.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_shared_state import *  # noqa: F403
