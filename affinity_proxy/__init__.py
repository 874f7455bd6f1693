"""affinity-proxy: a session-affinity reverse proxy and Fly.io edge router.

Importing the package has no side effects; it only carries the version.
"""

__version__ = "0.1.0"
