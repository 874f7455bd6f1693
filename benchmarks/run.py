"""Benchmark affinity-proxy against nginx (issue #6): one command, same-round ratios.

    python -m benchmarks.run [--duration 10] [--rounds 3] [--connections 50] [--quick]

Starts 3 fast nginx backends, then the targets — nginx as a cookie-hash reference proxy, the
direct backend, affinity-proxy in proxy mode and a fly-mode node answering replays (each on the
default fast engine — ``affinity-proxy``, ``affinity-fly`` — and on the aiohttp engine —
``affinity-aiohttp``, ``affinity-fly-aiohttp``), and a naive aiohttp proxy — each pinned to CPU 1
with taskset (wrk and the backends on CPU 0). wrk loads each target for a fixed time, in
interleaved rounds (every target once per round), and every figure is also given as a ratio
against nginx-proxy measured in the same round, so that a busy machine skews numerator and
denominator alike. Prints a table per round and the median over rounds, and writes
benchmarks/RESULTS.md (not with --quick unless --output is given). Installs Debian's nginx and wrk
with apt-get when they are missing. Loads 127.0.0.1 only; every process it starts is stopped by PID
at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import wrk
from benchmarks.targets import HarnessError, Processes, Target, cpu_seconds, run_main, start_targets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
REFERENCE = "nginx-proxy"
ALL_TARGETS = ("nginx-proxy", "direct", "affinity-proxy", "affinity-aiohttp", "affinity-fly", "affinity-fly-aiohttp",
               "naive-aiohttp")


@dataclass(frozen=True, slots=True)
class Row:
    """One target's figures (one run, or the medians over rounds)."""

    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu: float | None  # the target's CPU use during the run, in cores (1.0 = one core busy)
    rps_ratio: float | None = None  # against the reference of the same round
    p99_ratio: float | None = None


# --- tools -------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)


def ensure_tools(install: bool) -> tuple[str, str]:
    """nginx and wrk, installed from Debian's packages when missing (apt-get update first)."""
    missing = [name for name in ("nginx", "wrk") if find_tool(name) is None]
    if missing and install:
        print(f"installing {' '.join(missing)} (Debian packages)", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=900,
                       stdout=subprocess.DEVNULL)
    nginx_bin, wrk_bin = find_tool("nginx"), find_tool("wrk")
    if nginx_bin is None or wrk_bin is None:
        raise HarnessError("nginx and wrk are needed: apt-get install -y nginx wrk")
    if shutil.which("taskset") is None:
        raise HarnessError("taskset (util-linux) is needed")
    return nginx_bin, wrk_bin


def _output(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (proc.stdout + proc.stderr).strip()


def machine_info(nginx_bin: str, wrk_bin: str) -> dict[str, str]:
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


# --- runs and tables -------------------------------------------------------------------------------


def measure(target: Target, wrk_bin: str, script: Path, *, duration: float, connections: int,
            wrk_cpu: int | None) -> Row:
    headers = target.headers()
    argv = wrk.wrk_argv(wrk_bin, target.url, duration=duration, connections=connections, headers=headers,
                        script=script, cpu=wrk_cpu)
    pids = target.pids()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    result, _ = wrk.run_wrk(argv, duration=duration)
    cpu = (cpu_seconds(pids) - cpu0) / max(1e-9, time.monotonic() - t0)
    return Row(target.name, result.rps, result.p50_ms, result.p99_ms, result.errors(target.expected_status),
               result.requests, cpu)


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """The rows with req/s and p99 ratios against the reference row of the same list."""
    ref = next((r for r in rows if r.target == REFERENCE), None)
    if ref is None:
        return list(rows)
    return [
        Row(r.target, r.rps, r.p50_ms, r.p99_ms, r.errors, r.requests, r.cpu,
            r.rps / ref.rps if ref.rps else None, r.p99_ms / ref.p99_ms if ref.p99_ms else None)
        for r in rows
    ]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_rows(rounds: Sequence[Sequence[Row]]) -> list[Row]:
    """Per target: medians of the figures and of the per-round ratios; errors and requests summed."""
    out = []
    for name in [r.target for r in rounds[0]]:
        rs = [r for rnd in rounds for r in rnd if r.target == name]
        out.append(Row(
            name, _median([r.rps for r in rs]) or 0.0, _median([r.p50_ms for r in rs]) or 0.0,
            _median([r.p99_ms for r in rs]) or 0.0, sum(r.errors for r in rs), sum(r.requests for r in rs),
            _median([r.cpu for r in rs]), _median([r.rps_ratio for r in rs]), _median([r.p99_ratio for r in rs]),
        ))
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = ("target", "req/s", "p50 ms", "p99 ms", "errors", "target CPU", "req/s ÷ nginx", "p99 ÷ nginx")


def table(rows: Sequence[Row]) -> str:
    """A Markdown table (also readable as plain text)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---", *["---:"] * (len(HEADER) - 1)]) + "|"]
    for r in rows:
        cells = (r.target, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.errors:,}",
                 _fmt(r.cpu, ".2f"), _fmt(r.rps_ratio, ".2f"), _fmt(r.p99_ratio, ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: Sequence[Row]) -> list[str]:
    """Issue #6's "done when" checks on the median table."""
    by = {r.target: r for r in rows}
    out = []
    for name, engine in (("affinity-proxy", "fast"), ("affinity-aiohttp", "aiohttp")):
        if (p := by.get(name)) and p.rps_ratio is not None and p.p99_ratio is not None:
            ok = p.rps_ratio >= 0.5 and p.p99_ratio <= 2.0 and p.errors == 0
            out.append(f"- proxy mode ({engine} engine): {p.rps_ratio:.2f} x nginx req/s (target ≥ 0.5), p99 "
                       f"{p.p99_ratio:.2f} x nginx (target ≤ 2), {p.errors} errors (target 0): "
                       f"**{'met' if ok else 'not met'}**")
    for name, engine in (("affinity-fly", "fast"), ("affinity-fly-aiohttp", "aiohttp")):
        if (f := by.get(name)) and f.rps_ratio is not None:
            ok = f.rps_ratio >= 1.0 and f.errors == 0
            out.append(f"- fly-mode replay answers ({engine} engine): {f.rps_ratio:.2f} x nginx req/s (target ≥ 1.0), "
                       f"{f.errors} errors: **{'met' if ok else 'not met'}**")
    if (n := by.get("naive-aiohttp")) and n.rps_ratio is not None:
        out.append(f"- naive aiohttp baseline: {n.rps_ratio:.2f} x nginx req/s")
    return out


def results_markdown(info: dict[str, str], command: str, args: argparse.Namespace, targets: Sequence[Target],
                     rounds: Sequence[Sequence[Row]], load: tuple[str, str], started: dt.datetime) -> str:
    medians = median_rows(rounds)
    parts = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.run` (see the module docstring of `benchmarks/run.py`). "
        "Every ratio is against nginx-proxy **measured in the same round**; the median table shows the "
        "medians of the per-round figures and ratios (errors and requests summed over rounds).",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}",
        f"- versions: {info['versions']}",
        f"- affinity-proxy: commit {info['commit']}",
        f"- command: `{command}`",
        f"- load: wrk -t1 -c{args.connections} -d{args.duration:g}s per target per round, {args.rounds} rounds "
        f"interleaved (warm-up {args.warmup:g}s per target first); wrk on CPU {args.wrk_cpu}, the backends "
        f"(one nginx, 1 worker, 3 `return 200` servers) on CPU {args.backend_cpu}, every target on CPU "
        f"{args.target_cpu}",
        f"- load average before / after: {load[0]} / {load[1]} (other work on the machine adds noise)",
        "",
        "## Median over rounds",
        "",
        table(medians),
        "",
        *verdicts(medians),
        "",
        "## Targets",
        "",
        *[f"- **{t.name}**: {t.what}" for t in targets],
        "",
        "Errors are socket errors plus responses with an unexpected status (not 2xx/3xx; for the affinity-fly "
        "targets anything but 409). *target CPU* is the CPU time the target's processes used during the run divided "
        "by its length: about 1.00 means the target saturated its core, much less means the bottleneck was "
        "elsewhere (wrk and the backends share the other core).",
        "",
    ]
    for i, rnd in enumerate(rounds, 1):
        parts += [f"## Round {i}", "", table(rnd), ""]
    return "\n".join(parts)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per target per round (10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per target first (2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 s, 1 round, 1 s warm-up, no RESULTS.md")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)}")
    p.add_argument("--output", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--target-cpu", type=int, default=1)
    p.add_argument("--wrk-cpu", type=int, default=0)
    p.add_argument("--backend-cpu", type=int, default=0)
    p.add_argument("--no-install", action="store_true", help="fail instead of installing nginx/wrk with apt-get")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 1, 1.0
    elif args.output is None:
        args.output = RESULTS
    unknown = set(args.targets.split(",")) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 20 or not 1 <= args.connections <= 10_000:
        p.error("--duration 1..600, --rounds 1..20, --connections 1..10000")
    cpus = os.cpu_count() or 1
    for name in ("target_cpu", "wrk_cpu", "backend_cpu"):
        if getattr(args, name) >= cpus:
            flag = "--" + name.replace("_", "-")
            print(f"warning: only {cpus} CPU(s): {flag} {getattr(args, name)} -> 0", file=sys.stderr)
            setattr(args, name, 0)
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly (finally below) on SIGTERM as on Ctrl-C
    nginx_bin, wrk_bin = ensure_tools(install=not args.no_install)
    info = machine_info(nginx_bin, wrk_bin)
    names = [n for n in ALL_TARGETS if n in args.targets.split(",")]
    budget = len(names) * (args.rounds * (args.duration + 1) + args.warmup + 1) + 30
    print(f"{len(names)} targets, {args.rounds} rounds, {args.duration:g}s: about {budget / 60:.1f} min", flush=True)
    started = dt.datetime.now(dt.UTC)
    load_before = loadavg()
    rounds: list[list[Row]] = []
    with tempfile.TemporaryDirectory(prefix="affinity-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
        procs = Processes(workdir)
        try:
            targets = start_targets(procs, nginx_bin=nginx_bin, target_cpu=args.target_cpu,
                                    backend_cpu=args.backend_cpu, only=names)
            script = workdir / "status.lua"
            script.write_text(wrk.STATUS_LUA)
            if args.warmup > 0:
                for t in targets:
                    measure(t, wrk_bin, script, duration=args.warmup, connections=args.connections,
                            wrk_cpu=args.wrk_cpu)
            for i in range(args.rounds):
                shift = i % len(targets)  # a different target goes first in every round
                done = {}
                for t in targets[shift:] + targets[:shift]:
                    done[t.name] = measure(t, wrk_bin, script, duration=args.duration,
                                           connections=args.connections, wrk_cpu=args.wrk_cpu)
                    print(f"  round {i + 1}: {t.name:15} {done[t.name].rps:10,.0f} req/s", flush=True)
                rows = with_ratios([done[t.name] for t in targets])
                rounds.append(rows)
                print(f"\nround {i + 1} of {args.rounds}\n{table(rows)}\n", flush=True)
        finally:
            left = procs.finish()
    medians = median_rows(rounds)
    print(f"median over {len(rounds)} round(s)\n{table(medians)}\n" + "\n".join(verdicts(medians)))
    if args.output is not None:
        text = results_markdown(info, command, args, targets, rounds, (load_before, loadavg()), started)
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 1 if left else 0


if __name__ == "__main__":
    run_main(main)
