"""``tests/functional/test_dual_stack.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_dual_stack import *  # noqa: F403
