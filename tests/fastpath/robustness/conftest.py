"""``tests/robustness`` on the fast engine: every fixture and helper of its conftest (its
``__all__`` lists only helpers, so the module's namespace is copied whole), under
``tests/fastpath``'s autouse ``fast_engine``."""

import tests.robustness.conftest as _robustness

globals().update({name: value for name, value in vars(_robustness).items() if not name.startswith("__")})
