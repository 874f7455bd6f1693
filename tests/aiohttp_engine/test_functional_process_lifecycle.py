"""``tests/functional/test_process_lifecycle.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_process_lifecycle import *  # noqa: F403
