"""Demo and test tooling: app instances that report who served a request (``demo.backend``).

Nothing here is used by the proxy itself; ``affinity-proxy demo`` and the tests import it.
"""
