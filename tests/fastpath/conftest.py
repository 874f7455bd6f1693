"""The fast engine's own tests (framing, forwarding, caches, parity with the aiohttp engine).

``fast`` is the default engine, but these tests pin it explicitly so they keep testing it whatever
the default: every proxy started here gets ``engine: fast`` (see ``tests/support/engine.py``), and a
test fails if one ended up on another engine. Modules that set ``BOTH_ENGINES = True`` choose the
engine of each server themselves. The functional fixtures (``backends``, ``http``, ...) are imported.
"""

from tests.functional.conftest import *  # noqa: F403  (its fixtures; start_proxy is replaced below)
from tests.support.engine import engine_fixtures

forced_engine, start_proxy = engine_fixtures("fast")
