"""A local stand-in for Fly.io's edge proxy (``FlyEdge``), for ``demo --fly`` and the tests.

It is not part of the proxy's request path: a node in fly mode talks to the real Fly edge.
"""

from affinity_proxy.devtools.fly.edge import FlyEdge

__all__ = ["FlyEdge"]
