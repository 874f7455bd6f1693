"""The Fly edge stand-in (``affinity_proxy/devtools/fly``) on its own: machines are tiny aiohttp
apps, no proxy runs, so these tests do not run per engine."""

from tests.support.fly_machines import start_edge, start_machine  # noqa: F401  (fixtures)
