"""``tests/robustness/test_slow_clients.py`` on the fast engine (see ``tests/fastpath/conftest.py``)."""

from tests.robustness.test_slow_clients import *  # noqa: F403
