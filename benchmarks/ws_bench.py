"""WebSocket relay benchmark (issue #16): proxy CPU per round trip against nginx, same rounds.

    python -m benchmarks.ws_bench [--rounds 5] [--duration 8] [--connections 20] [--rate 5000]
                                  [--compare-ref REF] [--no-write]

One echo instance (``benchmarks.ws_peers``) and the client (this process, N connections each with
one 64-byte binary message in flight, sequence-numbered and checked) share CPU 0; every proxy runs
alone on CPU 1 (taskset): nginx with upgrade headers (``nginx.ws_proxy_conf``), the minimal Python
byte relay (``benchmarks.byte_relay``: what any Python relay can reach here), affinity-proxy with
the fast engine (``affinity-ws``) and with the aiohttp engine (``affinity-ws-aiohttp``).
Each round loads every target once, in a rotated order, at the same paced rate (``--rate``: CPU
per round trip depends on the rate, as one event-loop wake-up serves more sockets when busier);
per target it reports round trips/s and the proxy's CPU per round trip (utime + stime of its
processes, /proc/<pid>/stat, over the measured window only), taken as a ratio against nginx's in
the same round; the run's figure is the median of those ratios with their min-max. A round in
which other work took more than ``OTHER_CPU_LIMIT`` cores, or a target carried less than
``RATE_SHORTFALL`` of the rate, is flagged (kept). Any dropped, duplicated or reordered message fails
the run. Writes the WebSocket section of benchmarks/RESULTS.md (between its markers) unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import nginx
from benchmarks.refs import SEPARATOR, RefTree, Worktrees, check_imports_from, describe
from benchmarks.rounds import OTHER_CPU_LIMIT, Spread
from benchmarks.sections import WS_BENCH, carry_sections, replace_section
from benchmarks.targets import (
    HarnessError,
    Processes,
    Started,
    _proxy_yaml,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    run_main,
    softirq_threads,
    wait_ready,
)
from benchmarks.ws_peers import run_clients

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = WS_BENCH
REFERENCE = "nginx-ws"
CEILING = "byte-relay"  # benchmarks.byte_relay: bytes copied both ways, no parsing at all (the Python ceiling)
ALL_TARGETS = ("nginx-ws", CEILING, "affinity-ws", "affinity-ws-aiohttp")
#: Issue #16: proxy CPU per round trip at most this many times nginx's.
GOAL = 1.5
#: Round trips/s offered to every target: CPU per round trip depends on the rate (at a higher rate
#: one wake-up of the event loop serves more sockets), so every proxy carries the same one.
RATE = 5_000.0
#: A round is flagged when a target carried less than this fraction of the offered rate.
RATE_SHORTFALL = 0.95


@dataclass(frozen=True, slots=True)
class WsRow:
    """One target measured once: round trips/s, its CPU per round trip, other work meanwhile."""

    target: str
    rts: float
    cpu_us: float
    cpu: float
    other_cpu: float
    wrong: int
    ratio: float | None = None  # cpu_us against nginx-ws's in the same round


@dataclass
class WsTarget:
    name: str
    what: str
    port: int
    started: Started


def _wait_tcp(started: Started, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise HarnessError(f"{started.name} exited:\n{started.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise HarnessError(f"{started.name} did not listen on {port}:\n{started.log_tail()}")


def start(procs: Processes, want: Sequence[str], *, target_cpu: int, peer_cpu: int,
          refs: Sequence[RefTree] = ()) -> list[WsTarget]:
    """The echo instance, then every wanted proxy, each answering before any load; with ``refs``,
    a twin ``name@label`` of each affinity-proxy target run from that ref's worktree."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), LOG_LEVEL="WARNING")
    echo_port = free_port()
    echo = procs.start("ws-echo", [sys.executable, "-m", "benchmarks.ws_peers", "--listen", f"127.0.0.1:{echo_port}"],
                       cpu=peer_cpu, env=env)
    _wait_tcp(echo, echo_port)
    out = []
    if REFERENCE in want:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (procs.workdir / "nginx-ws-temp" / sub).mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = procs.workdir / "nginx-ws.conf"
        conf.write_text(nginx.ws_proxy_conf(procs.workdir, port, echo_port))
        s = procs.start(REFERENCE, nginx.nginx_argv("nginx", procs.workdir, conf, REFERENCE), cpu=target_cpu)
        _wait_tcp(s, port)
        out.append(WsTarget(REFERENCE, "nginx 1 worker, upgrade headers passed, proxy_http_version 1.1", port, s))
    if CEILING in want:
        port = free_port()
        s = procs.start(CEILING, [sys.executable, "-m", "benchmarks.byte_relay", "--listen", f"127.0.0.1:{port}",
                                  "--upstream", f"127.0.0.1:{echo_port}"], cpu=target_cpu, env=env)
        _wait_tcp(s, port)
        out.append(WsTarget(CEILING, "the Python ceiling: asyncio + uvloop, bytes copied both ways, no parsing, "
                                     "no limit", port, s))
    secret = secrets.token_hex(32)
    trees: list[tuple[str, dict[str, str], str]] = [("", env, "")]
    for tree in refs:
        check_imports_from(tree)
        trees.append((SEPARATOR + tree.label, dict(tree.env(), LOG_LEVEL="WARNING"), f" at {tree.sha[:12]}"))
    for suffix, tree_env, at in trees:
        for base, engine in (("affinity-ws", "fast"), ("affinity-ws-aiohttp", "aiohttp")):
            if base not in want:
                continue
            name = base + suffix
            port, admin = free_port(), free_port()
            conf = procs.workdir / f"{name.replace('/', '_')}.yaml"
            conf.write_text(_proxy_yaml(port, admin, secret, [("app-1", echo_port)], None, engine))
            s = procs.start(name, [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(conf)],
                            cpu=target_cpu, env=tree_env)
            wait_ready(s, port, "/_affinity/health")
            out.append(WsTarget(name, f"affinity-proxy{at}, engine {engine}, proxy mode, default limits "
                                      "(max_ws_message_bytes 4 MiB, ws_heartbeat 30 s)", port, s))
    return out


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
        return uvloop.new_event_loop
    except ImportError:
        return asyncio.new_event_loop


def measure(target: WsTarget, ours: Sequence[Started], *, connections: int, warmup: float, duration: float,
            rate: float) -> WsRow:
    """One load of ``target``: CPU counters read at both ends of the measured window only."""
    softirq = softirq_threads()

    def counters() -> tuple[float, float, float]:
        own = [os.getpid(), *(p for s in ours for p in s.pids())]
        return cpu_seconds(target.started.pids()), cpu_seconds(own) + cpu_seconds(softirq), machine_busy_seconds()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        stats, window, before, after = runner.run(
            run_clients("127.0.0.1", target.port, connections, warmup, duration, counters, rate))
    assert isinstance(before, tuple) and isinstance(after, tuple)
    if stats.errors:
        raise HarnessError(f"{target.name}: {stats.errors[:5]}")
    if stats.wrong or not stats.round_trips:
        raise HarnessError(f"{target.name}: {stats.wrong} wrong echoes, {stats.round_trips} round trips")
    cpu = after[0] - before[0]
    other = (after[2] - before[2]) - cpu - (after[1] - before[1])
    return WsRow(target.name, stats.round_trips / window, cpu / stats.round_trips * 1e6, cpu / window,
                 max(0.0, other / window), stats.wrong)


def with_ratios(rows: Sequence[WsRow]) -> list[WsRow]:
    ref = next((r for r in rows if r.target == REFERENCE), None)
    return [WsRow(r.target, r.rts, r.cpu_us, r.cpu, r.other_cpu, r.wrong,
                  r.cpu_us / ref.cpu_us if ref and ref.cpu_us else None) for r in rows]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary(rounds: Sequence[Sequence[WsRow]], names: Sequence[str]) -> tuple[str, list[str]]:
    """Medians (min-max) per target, and the issue's check for each affinity-proxy engine."""
    rows, verdicts = [], []
    for name in names:
        rs = [r for rnd in rounds for r in rnd if r.target == name]
        rts, us, cores, ratio = (Spread.of(r.rts for r in rs), Spread.of(r.cpu_us for r in rs),
                                 Spread.of(r.cpu for r in rs), Spread.of(r.ratio for r in rs))
        assert rts and us and cores
        rows.append((name, rts.cell(",.0f"), us.cell(".1f"), ratio.cell(".2f") if ratio else "-", cores.cell(".2f"),
                     str(sum(r.wrong for r in rs))))
        if name not in (REFERENCE, CEILING) and SEPARATOR not in name and ratio:
            met = "**met**" if ratio.median <= GOAL else "**not met**"
            verdicts.append(f"- {name}: proxy CPU per round trip {ratio.cell('.2f')} x nginx's (goal ≤ {GOAL}), "
                            f"0 dropped or reordered messages: {met}")
    header = ("target", "round trips/s", "proxy CPU µs / round trip", "÷ nginx (same round)", "proxy CPU (cores)",
              "wrong echoes")
    return _table(header, rows), verdicts


def round_table(rnd: Sequence[WsRow]) -> str:
    return _table(("target", "round trips/s", "CPU µs / rt", "÷ nginx", "CPU (cores)", "other CPU"), [
        (r.target, f"{r.rts:,.0f}", f"{r.cpu_us:.1f}", "-" if r.ratio is None else f"{r.ratio:.2f}", f"{r.cpu:.2f}",
         f"{r.other_cpu:.2f}") for r in rnd])


def section(args: argparse.Namespace, targets: Sequence[WsTarget], rounds: Sequence[Sequence[WsRow]],
            flagged: Sequence[int], refs: Sequence[RefTree] = ()) -> str:
    names = [t.name for t in targets]
    table, verdicts = summary(rounds, names)
    lines = [
        BEGIN,
        "## WebSocket relay (`make bench-ws`)",
        "",
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, `python -m benchmarks.ws_bench --rounds {args.rounds} "
        f"--duration {args.duration:g} --connections {args.connections}`, {platform.node() or 'host'} "
        f"({os.cpu_count()} CPUs), commit {_commit()}. {args.connections} connections, each with one 64-byte binary "
        "message in flight (sequence-numbered, every echo checked), through each proxy to one echo instance, "
        + (f"{args.rate:,.0f} round trips/s offered to every target (paced: CPU per round trip falls as the rate "
           "rises, so all carry the same load); " if args.rate else "as fast as the echoes come back; ")
        + f"the proxy alone on CPU {args.target_cpu}, the client and the instance on CPU {args.peer_cpu}. "
        "The figure is the proxy's CPU (utime + stime of its processes, /proc) per round trip over the measured "
        "window, as a ratio against nginx's in the same round; medians over the rounds with min-max."
        + (f" `<target>@REF`: the same target run from an earlier commit in the same rounds ({describe(refs)})."
           if refs else ""),
        "",
        table,
        "",
        *verdicts,
        "",
        f"Flagged rounds (other work above {OTHER_CPU_LIMIT:g} cores during a measurement, or a target below "
        f"{RATE_SHORTFALL:.0%} of the offered rate; kept above): "
        + (", ".join(str(i + 1) for i in flagged) or "none") + ".",
        "",
        "<details><summary>Every round</summary>",
        "",
        *(f"Round {i + 1}{' (flagged)' if i in flagged else ''}:\n\n{round_table(rnd)}\n" for i, rnd in
          enumerate(rounds)),
        "</details>",
        END,
    ]
    return "\n".join(lines)


def _commit() -> str:
    try:
        import subprocess
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the WebSocket section of ``path`` (between the markers), or append it."""
    path.write_text(replace_section(path.read_text() if path.exists() else "", text, WS_BENCH))


def carry_section(path: Path, text: str) -> str:
    """``text`` (a whole new RESULTS.md from ``benchmarks.run``) with the WebSocket section the file at
    ``path`` holds appended, so that a ``make bench`` run does not drop the last ``make bench-ws`` one."""
    return carry_sections(path, text, (WS_BENCH,))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ws_bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per target per round (8)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--rate", type=float, default=RATE,
                   help=f"round trips/s offered to every target, paced ({RATE:g}; 0: as fast as echoes return)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS))
    p.add_argument("--target-cpu", type=int, default=1)
    p.add_argument("--peer-cpu", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    p.add_argument("--compare-ref", action="append", default=[], metavar="REF",
                   help="also run the affinity-proxy targets of this commit (a git worktree) in the same rounds")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    want = [t for t in args.targets.split(",") if t]
    unknown = set(want) - set(ALL_TARGETS)
    if unknown:
        raise HarnessError(f"unknown targets: {', '.join(sorted(unknown))}")
    os.sched_setaffinity(0, {args.peer_cpu})
    procs = Processes(Path(tempfile.mkdtemp(prefix="ws-bench.")))
    worktrees = Worktrees()
    try:
        refs = [worktrees.add(ref) for ref in args.compare_ref]
        targets = start(procs, want, target_cpu=args.target_cpu, peer_cpu=args.peer_cpu, refs=refs)
        ours = [s for s in procs.started if s.name == "ws-echo"]
        rounds: list[list[WsRow]] = []
        for i in range(args.rounds):
            order = targets[i % len(targets):] + targets[:i % len(targets)]
            rows = {t.name: measure(t, ours, connections=args.connections, warmup=args.warmup,
                                    duration=args.duration, rate=args.rate) for t in order}
            rnd = with_ratios([rows[t.name] for t in targets])
            rounds.append(rnd)
            print(f"round {i + 1}/{args.rounds}\n{round_table(rnd)}\n", flush=True)
        flagged = [i for i, rnd in enumerate(rounds) if any(
            r.other_cpu > OTHER_CPU_LIMIT or (args.rate and r.rts < RATE_SHORTFALL * args.rate) for r in rnd)]
        text = section(args, targets, rounds, flagged, refs)
        print(text)
        if not args.no_write:
            write_section(text)
            print(f"wrote the WebSocket section of {RESULTS.relative_to(ROOT)}")
    finally:
        left = procs.finish()
        worktrees.remove_all()
    return 1 if left else 0


if __name__ == "__main__":
    run_main(main)
