"""``tests/functional/test_access_log.py`` on the fast engine (see this package's conftest)."""

from tests.functional.test_access_log import *  # noqa: F403
