"""``tests/robustness/test_http_parsing.py`` on the fast engine (see ``tests/fastpath/conftest.py``)."""

from tests.robustness.test_http_parsing import *  # noqa: F403
