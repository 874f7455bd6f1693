"""``python -m affinity_proxy`` and the ``affinity-proxy`` console script."""

from __future__ import annotations


def main() -> None:
    from affinity_proxy.cli.main import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
