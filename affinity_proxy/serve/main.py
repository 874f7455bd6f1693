"""``affinity-proxy serve``: one process (``runtime``) or a supervisor of several (``workers``).

Its own module so that ``workers`` can build on ``runtime`` without ``runtime`` knowing ``workers``.
"""

from __future__ import annotations

import logging
import sys

from affinity_proxy.config import Config
from affinity_proxy.observability.logs import configure_logging
from affinity_proxy.serve import runtime
from affinity_proxy.serve.workers import Supervisor

log = logging.getLogger("affinity_proxy.runtime")


def run_serve(config: Config, workers: int, *, config_path: str | None = None,
              app_command: str | None = None) -> int:
    """Entry point of ``affinity-proxy serve``. Returns the process exit code."""
    configure_logging(config.log.level, config.log.format)
    runtime.raise_open_file_limit()  # inherited by workers
    if workers != 1 and app_command:
        print("error: --exec runs one app beside one proxy process; use it with --workers 1", file=sys.stderr)
        return 2
    if workers != 1:
        if config.store.url.startswith("memory:"):
            print(
                "error: --workers > 1 needs a shared pin store (store.url: redis://...); the memory store "
                "lives in one process",
                file=sys.stderr,
            )
            return 2
        return Supervisor(config, workers, config_path=config_path).run()
    loop = runtime.new_event_loop()
    try:
        serving = runtime.serve_until_signal(config, config_path=config_path, app_command=app_command)
        return loop.run_until_complete(serving)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
