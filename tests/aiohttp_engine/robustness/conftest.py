"""``tests/robustness`` on the aiohttp engine: every fixture and helper of its conftest (its
``__all__`` lists only helpers, so the module's namespace is copied whole), under
``tests/aiohttp_engine``'s autouse ``forced_engine``."""

import tests.robustness.conftest as _robustness

globals().update({name: value for name, value in vars(_robustness).items() if not name.startswith("__")})
