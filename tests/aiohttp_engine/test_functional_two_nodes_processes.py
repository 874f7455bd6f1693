"""``tests/functional/test_two_nodes_processes.py`` on the aiohttp engine (see this package's conftest)."""

from tests.functional.test_two_nodes_processes import *  # noqa: F403
