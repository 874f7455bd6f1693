"""``tests/fly/test_fly_as_fly.py`` on the aiohttp engine (see this package's conftest)."""

from tests.fly.conftest import start_machine  # noqa: F401  (a fixture the module uses)
from tests.fly.test_fly_as_fly import *  # noqa: F403
