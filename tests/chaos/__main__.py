"""``python -m tests.chaos [--long] [--fault NAME ...] [--write PATH]``: run the chaos faults and
print the per-fault table. ``--long`` (60 s of traffic per fault, 46 clients, 2 nodes) writes
tests/chaos/RESULTS.md unless ``--write`` names another file (or ``--write -`` for none).
Exits 1 when a requirement was violated (the report still lists the violations).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import sys
from pathlib import Path

from tests.chaos.harness import FAULTS, LONG, SHORT, FaultReport, run_fault, table

RESULTS = Path(__file__).with_name("RESULTS.md")


def render(reports: list[FaultReport], profile_desc: str, command: str) -> str:
    lines = [
        "# Chaos under load: results of the last long run",
        "",
        f"Command: `{command}` ({datetime.date.today().isoformat()}, Python {platform.python_version()}, "
        f"{platform.machine()}). Harness: `tests/chaos/harness.py`; the short version of every fault runs in "
        "the normal suite (`pytest tests/chaos`), the long one is `pytest -m slow tests/chaos` or this command.",
        "",
        f"Setup: {profile_desc}",
        "",
        table(reports),
        "",
        "Columns: *sent*/*failed* all requests and WebSocket messages; *in flight* failures of requests (or "
        "WebSockets) already at the faulted instance when the fault hit; *detecting* failures of requests sent to "
        "the faulted instance before every node had detected it (kill/hang only); *live failed* failures of clients "
        "on an instance that stayed alive (requirement: 0); *re-pinned* client moves; *live moved* moves of clients "
        "on a live instance (requirement: 0); *detect* from the fault until every node saw it (instance `down`, or "
        "store down); *recover* from the fault until every client class succeeds again and every client of the "
        "faulted instance was served elsewhere; *back* from the restore until every node saw it `up` (or the store "
        "up); latencies of successful requests (one process runs the nodes, the instances and all clients).",
        "",
        "## Details",
        "",
    ]
    for report in reports:
        lines += ["```", report.details(), "```", ""]
    violations = [v for r in reports for v in r.violations]
    lines.append("Requirements: " + ("all met." if not violations else f"{len(violations)} violation(s), see above."))
    return "\n".join(lines) + "\n"


async def _with_watchdog(coro, profile):  # type: ignore[no-untyped-def]
    """Run ``coro``; if it outlives its phases by a minute, print every task's stack (then again
    each minute) so a stuck run says where it is stuck. Never cancels anything."""

    async def watch() -> None:
        grace = float(os.environ.get("CHAOS_WATCHDOG_GRACE", "60"))
        await asyncio.sleep(profile.warmup + profile.fault + profile.after + grace)
        for _ in range(10):
            print("watchdog: fault run overdue; tasks:", flush=True)
            for task in asyncio.all_tasks():
                print(" ", task.get_coro(), flush=True)
                for frame in task.get_stack(limit=6):
                    print("    ", frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, flush=True)
                awaited = getattr(task.get_coro(), "cr_await", None)  # the awaits below the task's frame
                while awaited is not None:
                    frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
                    if frame is not None:
                        print("     awaits", frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, flush=True)
                    else:
                        print("     awaits", repr(awaited)[:200], flush=True)
                    awaited = getattr(awaited, "cr_await", None)
            await asyncio.sleep(60)

    dog = asyncio.ensure_future(watch())
    try:
        return await coro
    finally:
        dog.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="the long version (60 s of traffic per fault)")
    parser.add_argument("--fault", action="append", choices=FAULTS, help="only these faults (repeatable)")
    parser.add_argument("--write", help="where to write the Markdown report ('-' for nowhere); "
                                        "default tests/chaos/RESULTS.md with --long, nowhere otherwise")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    profile = LONG if args.long else SHORT
    reports: list[FaultReport] = []
    for fault in args.fault or FAULTS:
        reports.append(asyncio.run(_with_watchdog(run_fault(fault, profile), profile)))
    print()
    print(table(reports))
    target = args.write or (str(RESULTS) if args.long else "-")
    if target != "-":
        p = profile
        desc = (f"profile `{p.name}`: {p.nodes} proxy nodes sharing one redis-server, instances a/b/c (demo "
                f"backends), {p.cookie} cookie + {p.user} user-key + {p.anon} anonymous HTTP clients (one request per "
                f"{p.interval * 1000:.0f} ms each, alternating nodes) and {p.ws} WebSocket clients (`whoami` every "
                f"{p.ws_interval * 1000:.0f} ms); per fault {p.warmup:.0f} s warm-up, {p.fault:.0f} s fault, "
                f"{p.after:.0f} s after the restore; health checks every 0.3 s (timeout 0.3 s, rise/fall 1), "
                "`limits.upstream_timeout` 1 s, "
                "`cookie.revalidate_after` 2 s (cookie clients also hit the store). "
                "Faults target the instance with the most pinned clients.")
        command = "python -m tests.chaos" + (" --long" if args.long else "")
        Path(target).write_text(render(reports, desc, command))
        print(f"wrote {target}")
    return 1 if any(r.violations for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
