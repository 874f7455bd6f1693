"""``tests/robustness/test_rfc_edges.py`` on the aiohttp engine (see ``tests/aiohttp_engine/conftest.py``)."""

from tests.robustness.test_rfc_edges import *  # noqa: F403
