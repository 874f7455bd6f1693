"""The functional, fly and robustness suites on the aiohttp engine (``engine: aiohttp``).

The default engine is ``fast``, so ``tests/functional``, ``tests/fly`` and ``tests/robustness`` cover
it; the modules here re-export their test functions so pytest runs them again with every proxy on
the aiohttp engine (see ``tests/support/engine.py``). ``test_suite_coverage.py`` checks that every
functional and robustness module has its twin here.
"""

from tests.functional.conftest import *  # noqa: F403  (its fixtures; start_proxy is replaced below)
from tests.support.engine import engine_fixtures

forced_engine, start_proxy = engine_fixtures("aiohttp")
