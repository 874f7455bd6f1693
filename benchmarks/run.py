"""Benchmark affinity-proxy against nginx and HAProxy (issues #6, #16): one command, same-round ratios.

    python -m benchmarks.run [--duration 8] [--rounds 5] [--legs 4] [--connections 50] [--quick] [--compare-ref REF ...]

Starts 3 fast nginx backends, then the targets, each pinned to CPU 1 with taskset (wrk and the
backends on CPU 0):

- pinned sessions (a cookie sent), against **nginx-proxy** (nginx, cookie hash): the direct backend,
  a minimal Python byte relay (the ceiling for any Python proxy), affinity-proxy in proxy mode and a
  fly-mode node answering replays (default fast engine ``affinity-proxy``, ``affinity-fly``; aiohttp
  engine ``affinity-aiohttp``, ``affinity-fly-aiohttp``), a naive aiohttp proxy;
- new sessions (no cookie: the proxy picks an instance and sets a cookie), against
  **haproxy-insert** (HAProxy ``cookie ... insert``): ``affinity-new``.

wrk (``-t1 -c50``) loads each target for a fixed time, in interleaved rounds (every target in every
round, a different one first each round, every other round in reverse order: a compared ref's twin
runs right after its target in one round and right before it in the next, so neither gains from its
place). Inside a round each target is measured in ``--legs K`` legs of D/K seconds (D =
``--duration``), the legs sweeping the round's order serpentine (forward, backward, forward, ...):
every target's legs spread evenly over the round, so that all of a round's targets see the same
drift of the machine's speed, and a target's figures for the round are its legs merged (requests
over seconds; p50 and p99 of the merged latency distributions; see ``rounds.combine_legs``).
Every figure is given as a ratio against its reference measured in the same round, and against
the byte relay of the same round; the run's figure is the median of the per-round ratios with
their min-max. A round whose reference looks off (reference req/s per
core of CPU, or direct ÷ nginx, more than 15 % from the run's median; or other work on the machine
taking CPU meanwhile) is flagged: kept and shown, with separate medians without it. Writes
benchmarks/RESULTS.md from this one run (not with --quick unless --output is given). Installs
Debian's nginx, wrk and haproxy with apt-get when missing. Loads 127.0.0.1 only; every process it
starts is stopped by PID at the end, also on error or Ctrl-C.

``--compare-ref REF`` (repeatable) checks REF out in a temporary git worktree and runs its proxy
beside the current one, in the same rounds: every selected affinity-proxy target gets a twin
``<target>@REF``, and the report gives ``current / REF same-round ratio`` per pair (issue #13: the
redesign keeps the figure within 5 % of the one before it). See benchmarks/refs.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks import wrk
from benchmarks.refs import COMPARABLE, RefError, RefTree, Worktrees, check_ref_syntax, describe, mirrored
from benchmarks.rounds import (
    CEILING,
    NEW_SESSION_REFERENCE,
    OTHER_CPU_LIMIT,
    REF_TOLERANCE,
    REFERENCE,
    TOLERANCE,
    Leg,
    Row,
    combine_legs,
    comparison_lines,
    flag_rounds,
    reference_table,
    round_order,
    round_table,
    serpentine,
    summarize,
    summary_table,
    unflagged,
    verdicts,
    with_ratios,
)
from benchmarks.sections import carry_sections
from benchmarks.targets import (
    ALL_TARGETS,
    HarnessError,
    Processes,
    Target,
    cpu_seconds,
    machine_busy_seconds,
    run_main,
    softirq_threads,
    start_targets,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_LEGS = 4

# --- tools -------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)


def ensure_tools(install: bool, haproxy: bool) -> tuple[str, str, str | None]:
    """nginx, wrk and (when ``haproxy``) haproxy, installed from Debian's packages when missing
    (apt-get update first)."""
    needed = ("nginx", "wrk", "haproxy") if haproxy else ("nginx", "wrk")
    missing = [name for name in needed if find_tool(name) is None]
    if missing and install:
        print(f"installing {' '.join(missing)} (Debian packages)", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=900,
                       stdout=subprocess.DEVNULL)
    nginx_bin, wrk_bin, haproxy_bin = find_tool("nginx"), find_tool("wrk"), find_tool("haproxy")
    if nginx_bin is None or wrk_bin is None or (haproxy and haproxy_bin is None):
        raise HarnessError(f"{', '.join(needed)} are needed: apt-get install -y {' '.join(needed)}")
    if shutil.which("taskset") is None:
        raise HarnessError("taskset (util-linux) is needed")
    return nginx_bin, wrk_bin, haproxy_bin


def _output(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (proc.stdout + proc.stderr).strip()


def machine_info(nginx_bin: str, wrk_bin: str, haproxy_bin: str | None) -> dict[str, str]:
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in ("aiohttp", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    versions["nginx"] = _output([nginx_bin, "-v"]).removeprefix("nginx version: ").removeprefix("nginx/")
    if haproxy_bin is not None:
        banner = _output([haproxy_bin, "-v"]).splitlines()[0]
        versions["haproxy"] = banner.removeprefix("HAProxy version ").split(" ")[0]
    versions["wrk"] = _output([wrk_bin, "-v"]).splitlines()[0].split(" [")[0].removeprefix("wrk ")
    commit = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "affinity_proxy"])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model,
        "kernel": platform.release(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "commit": commit + (" + uncommitted changes in affinity_proxy/" if dirty and dirty != "?" else ""),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"



# --- runs --------------------------------------------------------------------------------------


def own_cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (the wrk runs) so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(target: Target, procs: Processes, wrk_bin: str, script: Path, *, duration: float, connections: int,
            wrk_cpu: int | None) -> Leg:
    """One wrk run against ``target``: its figures (with the latency grid of the Lua script), its CPU
    use, and the CPU that went to anything but this run's processes meanwhile (``other_cpu``: the
    noise the flagging looks for)."""
    headers = target.headers()
    argv = wrk.wrk_argv(wrk_bin, target.url, duration=duration,
                        connections=connections, headers=headers, script=script, cpu=wrk_cpu)
    pids, everyone = target.pids(), procs.all_pids() + softirq_threads()
    t0 = time.monotonic()
    cpu0, ours0, own0, busy0 = cpu_seconds(pids), cpu_seconds(everyone), own_cpu_seconds(), machine_busy_seconds()
    result, _ = wrk.run_wrk(argv, duration=duration)
    busy = machine_busy_seconds() - busy0
    ours = cpu_seconds(everyone) - ours0 + own_cpu_seconds() - own0
    elapsed = max(1e-9, time.monotonic() - t0)
    cpu = cpu_seconds(pids) - cpu0
    # wrk's own duration of the run: requests / its req/s (the "in 2.00s" it prints is rounded)
    seconds = result.requests / result.rps if result.rps > 0 else result.seconds
    return Leg(target.name, result.requests, seconds, result.errors(target.expected_status), result.p50_ms,
               result.p99_ms, latency_grid=result.latency_grid, cpu_seconds=cpu, elapsed=elapsed,
               other_cpu=max(0.0, (busy - ours) / elapsed), reference=target.reference)


# --- RESULTS.md --------------------------------------------------------------------------------


def legs_text(legs: int, duration: float) -> str:
    """How a round loads each target, for RESULTS.md."""
    if legs == 1:
        return f"-d{duration:g}s per target per round"
    return (f"{legs} legs of {duration / legs:g}s per target per round, serpentine order (the legs sweep the "
            "round's targets forward, backward, forward, ...: every target's legs spread evenly over the round, "
            "so all of them see the same drift of the machine's speed; a target's legs are merged: requests over "
            "seconds, p50/p99 of the merged latency distributions)")


def results_markdown(info: Mapping[str, str], command: str, args: argparse.Namespace, targets: Sequence[Target],
                     rounds: Sequence[Sequence[Row]], flags: Mapping[int, Sequence[str]], load: tuple[str, str],
                     started: dt.datetime, minutes: float, refs: Sequence[RefTree] = ()) -> str:
    """The whole of RESULTS.md, from this one run."""
    everything = summarize(rounds)
    clean = unflagged(rounds, flags)
    banner = [
        "> **Regenerate with `make bench` on a quiet machine.** This file is written whole by one run of",
        "> `python -m benchmarks.run`; quote only its medians, with their per-round spread.",
    ]
    if flags:
        banner += [
            ">",
            f"> **{len(flags)} of {len(rounds)} rounds are flagged** (see *Flagged rounds*): the machine was not "
            "quiet, or a reference ran off its usual speed. Do not quote this run; run it again.",
        ]
    parts = [
        "# Benchmark results",
        "",
        *banner,
        "",
        "Pinned sessions (a cookie sent) are measured against **nginx-proxy**, new sessions (no cookie: the "
        "proxy picks an instance and sets a cookie) against **haproxy-insert**, the reference named in the "
        "*vs* column. Every ratio is taken **inside one round**; a figure is the median of the per-round "
        f"ratios, with their min-max in parentheses. *req/s ÷ relay* is against the {CEILING} of the same round: "
        "a minimal asyncio + uvloop byte relay without HTTP parsing, the ceiling for any Python proxy here.",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')} ({minutes:.1f} min)",
        f"- machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}",
        f"- versions: {info['versions']}",
        f"- affinity-proxy: commit {info['commit']}",
        *([f"- compared with (`<target>@REF`, a git worktree run with the same interpreter): {describe(refs)}"]
          if refs else []),
        f"- command: `{command}`",
        f"- load: wrk -t1 -c{args.connections}, {legs_text(args.legs, args.duration)}, "
        f"{len(rounds)} rounds interleaved, every other one in reverse order (warm-up {args.warmup:g}s per target "
        "first); "
        f"wrk on CPU {args.wrk_cpu}, the backends "
        f"(one nginx, 1 worker, 3 `return 200` servers) on CPU {args.backend_cpu}, every target on CPU "
        f"{args.target_cpu}",
        f"- flagging: a reference's req/s per core or direct ÷ nginx more than {args.tolerance:.0%} from the run's "
        f"median, or other work above {args.other_cpu_limit:g} cores during a measurement",
        f"- load average before / after: {load[0]} / {load[1]}",
        "",
        f"## Medians over all {len(rounds)} rounds",
        "",
        summary_table(everything),
        "",
        *verdicts(everything),
        "",
        *(["## Against earlier commits", "",
           "Each line is the median of per-round req/s ratios of a target to its twin at the ref, measured in "
           f"the same round (min-max in parentheses); issue #13 asks for at least {1 - REF_TOLERANCE:.2f}.", "",
           *comparison_lines(rounds), ""] if refs else []),
        "## Flagged rounds",
        "",
        reference_table(rounds, flags),
        "",
        *([f"- round {i + 1}: {'; '.join(reasons)}" for i, reasons in flags.items()] or ["No round is flagged."]),
        "",
    ]
    if flags and clean:
        parts += [f"## Medians without the flagged rounds ({len(clean)} of {len(rounds)})", "",
                  summary_table(summarize(clean)), "", *verdicts(summarize(clean)), ""]
    elif flags:
        parts += ["Every round is flagged: no medians without them.", ""]
    parts += [
        "## Targets",
        "",
        *[f"- **{t.name}** (vs {t.reference}): {t.what}" for t in targets],
        "",
        "Errors are socket errors plus responses with an unexpected status (not 2xx/3xx; for the affinity-fly "
        "targets anything but 409). *target CPU* is the CPU time the target's processes used during the run divided "
        "by its length: about 1.00 means the target saturated its core, much less means the bottleneck was "
        "elsewhere (wrk and the backends share the other core). *other CPU* is the machine's busy time (steal "
        "included) minus this run's processes (targets, backends, wrk, harness), in cores: near 0 on a quiet machine.",
        "",
    ]
    for i, rnd in enumerate(rounds):
        note = " (flagged)" if i in flags else ""
        parts += [f"## Round {i + 1}{note}", "", round_table(rnd), ""]
    return "\n".join(parts)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per target per round (8)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--legs", type=int, default=None,
                   help="legs per target per round, of duration/legs whole seconds each, in serpentine order (4; "
                        "1 with --quick; 1 = one run per target per round)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per target first (2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 s, 1 round, 1 s warm-up, no RESULTS.md")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)}")
    p.add_argument("--output", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"flag a round whose reference is this fraction off the run's median ({TOLERANCE:g})")
    p.add_argument("--other-cpu-limit", type=float, default=OTHER_CPU_LIMIT,
                   help=f"flag a round in which other work took more cores than this ({OTHER_CPU_LIMIT:g})")
    p.add_argument("--target-cpu", type=int, default=1)
    p.add_argument("--wrk-cpu", type=int, default=0)
    p.add_argument("--backend-cpu", type=int, default=0)
    p.add_argument("--no-install", action="store_true",
                   help="fail instead of installing nginx/wrk/haproxy with apt-get")
    p.add_argument("--compare-ref", action="append", default=[], metavar="REF", type=_ref_arg,
                   help="also run REF's proxy (a git worktree of this repository) as <target>@REF for each selected "
                        f"target of {','.join(COMPARABLE)}, in the same rounds; repeatable")
    args = p.parse_args(argv)
    if args.legs is None:
        args.legs = 1 if args.quick else DEFAULT_LEGS
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 1, 1.0
    elif args.output is None:
        args.output = RESULTS
    unknown = set(args.targets.split(",")) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 20 or not 1 <= args.connections <= 10_000:
        p.error("--duration 1..600, --rounds 1..20, --connections 1..10000")
    if not 0 < args.tolerance < 1 or args.other_cpu_limit < 0:
        p.error("--tolerance in (0, 1), --other-cpu-limit ≥ 0")
    leg = args.duration / args.legs if args.legs >= 1 else 0.0
    if not 1 <= args.legs <= 20 or leg < 1 or abs(leg - round(leg)) > 1e-9:
        p.error(f"--legs 1..20 with --duration / --legs whole seconds of at least 1 (wrk's -d): "
                f"{args.duration:g} / {args.legs}")
    if args.compare_ref and not mirrored(args.targets.split(",")):
        p.error(f"--compare-ref needs at least one of {','.join(COMPARABLE)} in --targets")
    if len(set(args.compare_ref)) != len(args.compare_ref):
        p.error("--compare-ref: the same ref twice")
    cpus = os.cpu_count() or 1
    for name in ("target_cpu", "wrk_cpu", "backend_cpu"):
        if getattr(args, name) >= cpus:
            flag = "--" + name.replace("_", "-")
            print(f"warning: only {cpus} CPU(s): {flag} {getattr(args, name)} -> 0", file=sys.stderr)
            setattr(args, name, 0)
    return args


def _ref_arg(value: str) -> str:
    try:
        return check_ref_syntax(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count_targets(names: Sequence[str], refs: int) -> int:
    """How many targets a run loads: the selected ones and a twin of each comparable one per ref."""
    return len(names) + refs * len(mirrored(names))


#: Wall time around each wrk run beyond its duration: wrk's start and stop, the CPU sampling before
#: and after, the progress line. Measured: 0.015-0.12 s per run (1 and 2 s runs against nginx-proxy,
#: affinity-proxy and affinity-fly), about 0.05 s on average over the 125 runs of a 5-target 5-round
#: run with --legs 4 (3.6 min against 3.5 with --legs 1); rounded up.
LEG_OVERHEAD = 0.1


def estimate_seconds(targets: int, rounds: int, duration: float, warmup: float, legs: int = 1) -> float:
    """About how long a run takes: every leg plus its overhead, the warm-ups, and the start-up."""
    return targets * (rounds * (duration + legs * LEG_OVERHEAD) + (warmup + LEG_OVERHEAD if warmup > 0 else 0)) + 30


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly (finally below) on SIGTERM as on Ctrl-C
    names = [n for n in ALL_TARGETS if n in args.targets.split(",")]
    nginx_bin, wrk_bin, haproxy_bin = ensure_tools(install=not args.no_install, haproxy="haproxy-insert" in names)
    info = machine_info(nginx_bin, wrk_bin, haproxy_bin)
    count = count_targets(names, len(args.compare_ref))
    budget = estimate_seconds(count, args.rounds, args.duration, args.warmup, args.legs)
    print(f"{count} targets, {args.rounds} rounds, {args.duration:g}s in {args.legs} leg(s) per target per round: "
          f"about {budget / 60:.1f} min", flush=True)
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    load_before = loadavg()
    rounds: list[list[Row]] = []
    worktrees = Worktrees()  # removed in the finally below (and at exit, should that be skipped)
    try:
        refs = [worktrees.add(ref) for ref in args.compare_ref]
    except RefError as exc:
        worktrees.remove_all()
        raise HarnessError(str(exc)) from None
    if refs:
        print(f"comparing with {describe(refs)} (git worktrees {', '.join(str(t.path) for t in refs)})", flush=True)
    with tempfile.TemporaryDirectory(prefix="affinity-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
        procs = Processes(workdir)
        try:
            targets = start_targets(procs, nginx_bin=nginx_bin, haproxy_bin=haproxy_bin, target_cpu=args.target_cpu,
                                    backend_cpu=args.backend_cpu, only=names, refs=refs)
            script = workdir / "status.lua"
            script.write_text(wrk.STATUS_LUA)
            load = functools.partial(measure, procs=procs, wrk_bin=wrk_bin, script=script,
                                     connections=args.connections, wrk_cpu=args.wrk_cpu)
            if args.warmup > 0:
                for t in targets:
                    load(t, duration=args.warmup)
            for i in range(args.rounds):
                # a different target first in every round, every other round reversed; the legs sweep
                # that order forward, backward, forward, ... (see the docstring)
                legs: dict[str, list[Leg]] = {t.name: [] for t in targets}
                for k, t in serpentine(round_order(targets, i), args.legs):
                    leg = load(t, duration=args.duration / args.legs)
                    legs[t.name].append(leg)
                    print(f"  round {i + 1}" + (f" leg {k + 1}/{args.legs}" if args.legs > 1 else "")
                          + f": {t.name:28} {leg.rps:10,.0f} req/s, other CPU {leg.other_cpu or 0:.2f}", flush=True)
                rows = with_ratios([combine_legs(legs[t.name]) for t in targets])
                rounds.append(rows)
                print(f"\nround {i + 1} of {args.rounds}\n{round_table(rows)}\n", flush=True)
        except RefError as exc:
            raise HarnessError(str(exc)) from None
        finally:
            left = procs.finish()
            worktrees.remove_all()
    flags = flag_rounds(rounds, tolerance=args.tolerance, other_cpu_limit=args.other_cpu_limit)
    summaries = summarize(rounds)
    print(f"median (min-max) over {len(rounds)} round(s); vs nginx = {REFERENCE}, vs haproxy = "
          f"{NEW_SESSION_REFERENCE}\n{summary_table(summaries)}\n" + "\n".join(verdicts(summaries)))
    for i, reasons in flags.items():
        print(f"flagged round {i + 1}: {'; '.join(reasons)}")
    if refs:
        print("\n" + "\n".join(comparison_lines(rounds)))
    if flags and (clean := unflagged(rounds, flags)):
        print(f"\nwithout the {len(flags)} flagged round(s):\n{summary_table(summarize(clean))}")
        if refs:
            print("\n".join(comparison_lines(clean)))
    minutes = (time.monotonic() - t0) / 60
    if flags:
        print(f"\nwarning: {len(flags)} of {len(rounds)} rounds flagged: the machine was not quiet or a reference ran "
              "off its usual speed; do not quote this run", file=sys.stderr)
    if args.output is not None:
        text = results_markdown(info, command, args, targets, rounds, flags, (load_before, loadavg()), started, minutes,
                                refs)
        args.output.write_text(carry_sections(args.output, text))  # keeps the bench-ws and bench-budget sections
        print(f"wrote {args.output} ({minutes:.1f} min)")
    return 1 if left else 0


if __name__ == "__main__":
    run_main(main)
