"""``tests/robustness/test_security.py`` on the fast engine (see ``tests/fastpath/conftest.py``)."""

from tests.robustness.test_security import *  # noqa: F403
