"""``tests/functional/test_safe_admin_and_session_check.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_safe_admin_and_session_check import *  # noqa: F403
