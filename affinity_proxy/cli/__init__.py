"""The ``affinity-proxy`` command line: ``main`` (the click group), one module per command family.

``store`` (pins, instances, reap) reaches pins through a ``PinBackend``: ``redis_backend`` (Redis
directly) or ``admin`` (a node's admin API); ``base`` and ``output`` are shared plumbing."""
