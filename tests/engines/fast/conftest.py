"""The fast engine's own tests (framing, forwarding, caches, parity with the aiohttp engine).

``fast`` is the default engine, but these tests pin it explicitly so they keep testing it whatever
the default: ``engine`` is ``fast`` here, so ``start_proxy`` (``tests/conftest.py``) refuses a
config naming another engine. Modules comparing both engines build each server's config with its
engine themselves.
"""

import pytest


@pytest.fixture(autouse=True)
def engine() -> str:
    """The engine of every proxy ``start_proxy`` starts in this package."""
    return "fast"
