"""``tests/robustness/test_fuzz_parsers.py`` on the fast engine (see ``tests/fastpath/conftest.py``)."""

from tests.robustness.test_fuzz_parsers import *  # noqa: F403
