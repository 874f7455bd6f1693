"""Where a request's CPU goes (issue #16): µs per request by stage, from py-spy samples under wrk load.

    python -m benchmarks.cpu_budget [--duration 5] [--rounds 3] [--target affinity-proxy ...]
                                    [--compare-ref REF] [--write] [--verbose]

Starts the same backends and affinity-proxy process as ``make bench`` (proxy mode, fast engine,
pinned to CPU 1 with taskset; wrk and the backends on CPU 0) and loads each target with wrk twice
per round: once alone, to read its CPU time per request from /proc (utime and stime over the run,
divided by wrk's request count), and once while ``py-spy record --native`` samples it. Kernel time
(stime) is the ``syscalls`` row as measured; user time is split by the share of the samples taken
outside system calls whose stack falls in each stage. A sample goes to the innermost frame that
matches a stage rule (so the cookie HMAC inside ``decide`` counts as cookie); samples that match no
rule are ``other`` (``--verbose`` prints the frames they end in). py-spy stops the process to
sample it, which over-weights stacks inside system calls: that is why the kernel row comes from
the kernel's own accounting and not from samples.

``--compare-ref REF`` checks REF out in a temporary git worktree (benchmarks/refs.py) and measures
its proxy in the same run, interleaved with the current one (``<target>@REF``; every other round in
reverse order, as ``benchmarks.run`` does): the table has a *before* (REF) and an *after* (current)
column, medians over the rounds, with the min-max of the totals. ``--write`` puts that table into
the CPU-budget section of benchmarks/RESULTS.md (between its markers, benchmarks/sections.py).

Needs py-spy (``pip install py-spy``; ptrace as root or with ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import wrk
from benchmarks.refs import RefError, RefTree, Worktrees, check_ref_syntax, split_target_name
from benchmarks.rounds import OTHER_CPU_LIMIT, Spread
from benchmarks.run import ensure_tools, loadavg, machine_info, own_cpu_seconds
from benchmarks.sections import CPU_BUDGET, write_section
from benchmarks.targets import (
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
OTHER = "other"
SYSCALLS = "syscalls"
#: The commit before the performance work of issue #16 (a3d0e59 is its first commit): ``make bench-budget``'s
#: *before* column.
BEFORE_REF = "a3d0e59^"
#: The targets measured by default: the pinned path and the new-session path (benchmarks/targets.py).
TARGETS = ("affinity-proxy", "affinity-new")
TITLES = {
    "affinity-proxy": "Pinned session (`affinity-proxy`: affinity cookie sent, proxy mode, fast engine)",
    "affinity-new": "New session (`affinity-new`: no cookie, the proxy places the client and mints a cookie)",
}
#: Stages in table order.
STAGES = ("parse", "decide", "cookie", "rewrite", "pool", "write", "exchange", "metrics", SYSCALLS, "event loop",
          OTHER)

#: The fast engine's package: ``engines/fast/`` now, ``fastpath/`` before the redesign of #13 and #16.
_FAST = r"(?:engines/fast|fastpath)/"

#: (stage, frame pattern): the first pattern in this order that the *innermost-first* walk of a
#: stack meets names the stage. Frames look like ``function (path/to/file.py:line)`` for Python and
#: ``symbol (library.so)`` for native code. Both trees are covered: the current one (engines/fast/,
#: proxy/) and the one before #16 (fastpath/ for the fast engine, web/ and forwarding/ for the
#: engine-neutral parts the fast engine calls).
STAGE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((stage, re.compile(pattern)) for stage, pattern in (
    # the libc wrappers of system calls (their kernel time is measured, not sampled: see Budget)
    (SYSCALLS, r"^(send|recv|sendmsg|recvmsg|sendto|recvfrom|writev|readv|write|read|epoll_pwait|epoll_wait|"
               r"epoll_ctl|accept4|accept|close|shutdown|setsockopt|getsockopt|__libc_\w+|syscall) \(libc"),
    # the cookie: its HMAC, base64 and parsing (routing/cookie_header.py too). OpenSSL's digest frames
    # (EVP_*, SHA256_*, _hashlib's md5) name no stage: their caller does (the ring's md5 is decide's).
    ("cookie", r"(routing/cookie|hmac|HMAC|base64|binascii)"),
    # classes that share a module with another stage's code (engines/fast/protocol.py, route.py, rewrite.py;
    # before: fastpath/framing.py, hot.py, response.py)
    ("parse", r"^RequestFraming\."),
    ("exchange", r"^HotRoutes?\."),
    ("write", r"^(ResponseHead|ResponseCache)\."),
    ("decide", r"(routing/|proxy/(act|resolve|context|fly)\.py|web/(resolve|context|fly)\.py|membership/|"
               r"placement/|pins/|uhashring|" + _FAST + r"(route|mint)\.py)"),
    ("rewrite", r"(" + _FAST + r"rewrite\.py|proxy/(headers|realip)\.py|forwarding/headers\.py)"),
    ("parse", r"(" + _FAST + r"(head|wire|framing)\.py|llhttp|httptools|_http_parser)"),
    ("pool", _FAST + r"(upstream|lane|ports|pool)\.py"),
    ("write", r"(" + _FAST + r"response\.py|transport.*write|write \(|writelines \()"),
    ("exchange", _FAST + r"(counting|closing|exchange|forward|forward_lane|hot|protocol|server|handoff)\.py"),
    ("event loop", r"(uvloop|loop\.cpython|asyncio/|libuv|uv_run|uv__|\((loop|core|linux|stream|handles|"
                   r"timer|tcp|poll)\.c:)"),
    ("metrics", r"(prometheus_client|observability/)"),
))


@dataclass(frozen=True, slots=True)
class Budget:
    """One target measured once: µs of CPU per request, per stage, and what they come from."""

    requests: int  # of the unsampled run
    user_seconds: float
    sys_seconds: float
    per_stage: dict[str, int]  # samples per stage (the syscalls stage included)
    errors: int = 0  # wrk's socket errors and non-2xx/3xx answers, both runs
    other_cpu: float | None = None  # cores other work took during the unsampled run
    others: Counter[str] = field(default_factory=Counter)  # innermost frames of the CATCH_ALL stages' samples

    @property
    def user_samples(self) -> int:
        return sum(n for stage, n in self.per_stage.items() if stage != SYSCALLS)

    @property
    def us_per_request(self) -> float:
        return (self.user_seconds + self.sys_seconds) / max(1, self.requests) * 1e6

    def stage_us(self, stage: str) -> float:
        if stage == SYSCALLS:
            return self.sys_seconds / max(1, self.requests) * 1e6
        user_us = self.user_seconds / max(1, self.requests) * 1e6
        return user_us * self.per_stage.get(stage, 0) / max(1, self.user_samples)


def stage_of(frames: Sequence[str]) -> str:
    """The stage of one stack (outermost first, as py-spy writes it): the innermost frame that a rule
    names decides."""
    for frame in reversed(frames):
        for stage, pattern in STAGE_RULES:
            if pattern.search(frame):
                return stage
    return OTHER


def _samples(lines: Iterable[str]) -> Iterable[tuple[list[str], int]]:
    """``(frames, count)`` per line of py-spy's raw (collapsed stack) output, ``f1;f2;f3 count``."""
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        yield frames, int(count)


def parse_collapsed(lines: Iterable[str]) -> Counter[str]:
    """Samples per stage from py-spy's raw output."""
    out: Counter[str] = Counter()
    for frames, count in _samples(lines):
        out[stage_of(frames)] += count
    return out


#: The stages ``--verbose`` lists the innermost frames of: *other* is what no rule names, and *event
#: loop* also takes every stack that only the loop's outermost frames name.
CATCH_ALL = (OTHER, "event loop")


def other_frames(lines: Iterable[str], depth: int = 2, stages: Sequence[str] = CATCH_ALL) -> Counter[str]:
    """The samples of ``stages`` by stage and their ``depth`` innermost frames (``stage: inner <- caller``):
    what a new stage rule would have to match (``--verbose``)."""
    out: Counter[str] = Counter()
    for frames, count in _samples(lines):
        if (stage := stage_of(frames)) in stages:
            out[f"{stage}: " + (" <- ".join(reversed(frames[-depth:])) or "(empty stack)")] += count
    return out


def user_sys_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """utime and stime of ``pids`` so far, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = sys_ = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        sys_ += int(fields[12])
    return user / tick, sys_ / tick


# --- figures over rounds (pure) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """One target over the rounds: the median µs per request of every stage, and of the total with
    its min-max (the stage medians need not add up to the total's)."""

    rounds: int
    stage_us: dict[str, float]
    total: Spread
    requests: int
    samples: int
    errors: int

    @classmethod
    def of(cls, budgets: Sequence[Budget]) -> Figures:
        if not budgets:
            raise ValueError("no measurement")
        total = Spread.of(b.us_per_request for b in budgets)
        assert total is not None
        return cls(len(budgets), {s: statistics.median(b.stage_us(s) for b in budgets) for s in STAGES}, total,
                   sum(b.requests for b in budgets), sum(sum(b.per_stage.values()) for b in budgets),
                   sum(b.errors for b in budgets))


def flagged_rounds(rounds: Sequence[Mapping[str, Budget]], limit: float = OTHER_CPU_LIMIT) -> list[int]:
    """The rounds (0-based) in which other work took more than ``limit`` cores during a measurement
    (kept in the figures, said in the section: the machine was not quiet)."""
    return [i for i, r in enumerate(rounds) if any((b.other_cpu or 0.0) > limit for b in r.values())]


def same_round_ratio(rounds: Sequence[Mapping[str, Budget]], after: str, before: str) -> Spread | None:
    """Median (min-max) over the rounds of ``after``'s total µs per request ÷ ``before``'s, each
    pair measured in the same round."""
    return Spread.of(r[after].us_per_request / r[before].us_per_request for r in rounds
                     if after in r and before in r and r[before].us_per_request > 0)


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header)))
             + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _diff(after: float, before: float) -> tuple[str, str]:
    pct = f"{100 * (after - before) / before:+.0f} %" if before >= 0.05 else "-"
    return f"{after - before:+.1f}", pct


def table(budget: Budget, label: str) -> str:
    """One measurement as a table: µs per stage with its share and where it comes from."""
    rows = []
    for stage in STAGES:
        share = budget.stage_us(stage) / max(1e-9, budget.us_per_request)
        how = "kernel time" if stage == SYSCALLS else f"{budget.per_stage.get(stage, 0)} samples"
        rows.append((stage, f"{budget.stage_us(stage):.1f}", f"{100 * share:.0f} % ({how})"))
    rows.append(("**total**", f"**{budget.us_per_request:.1f}**", f"{budget.requests} requests"))
    return _markdown(("stage", f"µs/request ({label})", "share"), rows)


def figures_table(columns: Sequence[tuple[str, Figures]]) -> str:
    """µs per request by stage, one column per tree; with two (before, after) their difference."""
    header = ["stage", *(f"{label} µs" for label, _ in columns)]
    pair = len(columns) == 2
    if pair:
        header += ["after - before µs", "change"]
    rows = []
    for stage in STAGES:
        values = [f.stage_us[stage] for _, f in columns]
        rows.append([stage, *(f"{v:.1f}" for v in values), *(_diff(values[1], values[0]) if pair else ())])
    totals = [f.total for _, f in columns]
    rows.append(["**total** (min-max)", *(f"**{t.median:.1f}** ({t.lo:.1f}-{t.hi:.1f})" for t in totals),
                 *((f"**{_diff(totals[1].median, totals[0].median)[0]}**", _diff(totals[1].median,
                                                                                 totals[0].median)[1])
                   if pair else ())])
    return _markdown(header, rows)


def reading(before: Figures, after: Figures, ratio: Spread | None, *, top: int = 3) -> str:
    """A sentence on one target: the total's change, the stages that moved most, what is left unnamed."""
    moved = sorted((s for s in STAGES if s != OTHER), key=lambda s: abs(after.stage_us[s] - before.stage_us[s]),
                   reverse=True)[:top]
    change = ", ".join(f"{s} {after.stage_us[s] - before.stage_us[s]:+.1f}" for s in moved)
    same_round = f"; same-round after ÷ before {ratio.cell('.2f')}" if ratio else ""
    share = [100 * f.stage_us[OTHER] / max(1e-9, f.total.median) for f in (before, after)]
    kernel = [f.stage_us[SYSCALLS] for f in (before, after)]
    user = [sum(v for s, v in f.stage_us.items() if s != SYSCALLS) for f in (before, after)]
    return (f"{before.total.median:.1f} → {after.total.median:.1f} µs per request "
            f"({_diff(after.total.median, before.total.median)[1]}{same_round}): user time {user[0]:.1f} → "
            f"{user[1]:.1f} µs, kernel time {kernel[0]:.1f} → {kernel[1]:.1f} µs; moved most: {change} µs; "
            f"unattributed (*other*) {share[0]:.0f} % before, {share[1]:.0f} % after.")


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tools:
    wrk: str
    py_spy: str
    rate: int
    duration: float
    connections: int


def measure(target: Target, procs: Processes, tools: Tools, workdir: Path, tag: str) -> Budget:
    """One round of ``target``: an unsampled wrk run for its CPU per request (/proc), then one sampled
    by py-spy for the split of its user time."""
    headers, pids = target.headers(), target.pids()
    argv = wrk.wrk_argv(tools.wrk, target.url, duration=tools.duration, connections=tools.connections,
                        headers=headers, cpu=0)
    everyone = procs.all_pids() + softirq_threads()
    t0, busy0, ours0, own0 = time.monotonic(), machine_busy_seconds(), cpu_seconds(everyone), own_cpu_seconds()
    user0, sys0 = user_sys_seconds(pids)
    result, _ = wrk.run_wrk(argv, duration=tools.duration)
    user1, sys1 = user_sys_seconds(pids)
    ours = cpu_seconds(everyone) - ours0 + own_cpu_seconds() - own0
    other = max(0.0, (machine_busy_seconds() - busy0 - ours) / max(1e-9, time.monotonic() - t0))
    out = workdir / f"stacks-{tag}.txt"
    spy = subprocess.Popen([tools.py_spy, "record", "--pid", str(pids[0]), "--rate", str(tools.rate), "--format",
                            "raw", "--native", "--duration", str(int(tools.duration) + 1), "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    sampled, _ = wrk.run_wrk(argv, duration=tools.duration)
    _, err = spy.communicate(timeout=tools.duration + 30)
    if not out.exists():
        raise HarnessError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
    if os.environ.get("BUDGET_KEEP"):
        shutil.copy(out, Path(os.environ["BUDGET_KEEP"]) / out.name)
    lines = out.read_text().splitlines()
    return Budget(result.requests, user1 - user0, sys1 - sys0, dict(parse_collapsed(lines)),
                  errors=result.errors() + sampled.errors(), other_cpu=other, others=other_frames(lines))


def run_rounds(targets: Sequence[Target], procs: Processes, tools: Tools, workdir: Path, rounds: int,
               warmup: float) -> list[dict[str, Budget]]:
    """Every target once per round, interleaved as ``benchmarks.run`` does: a different one first in
    every round, every other round in reverse order (a ref's twin runs after its target in one round
    and before it in the next)."""
    for t in targets:
        wrk.run_wrk(wrk.wrk_argv(tools.wrk, t.url, duration=warmup, connections=tools.connections,
                                 headers=t.headers(), cpu=0), duration=warmup)
    out: list[dict[str, Budget]] = []
    for i in range(rounds):
        order = list(targets) if i % 2 == 0 else list(targets)[::-1]
        shift = (i // 2) % len(order)
        done: dict[str, Budget] = {}
        for t in order[shift:] + order[:shift]:
            done[t.name] = b = measure(t, procs, tools, workdir, f"{i + 1}-{t.name}".replace("/", "_"))
            print(f"  round {i + 1}: {t.name:28} {b.us_per_request:6.1f} µs/request ({b.requests} requests, "
                  f"{sum(b.per_stage.values())} samples, other CPU {b.other_cpu or 0:.2f})", flush=True)
        out.append(done)
    return out


# --- RESULTS.md --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """What a section needs besides the figures: how and where the run went."""

    command: str
    started: dt.datetime
    minutes: float
    info: Mapping[str, str]
    load: tuple[str, str]
    rounds: int
    duration: float
    rate: int
    connections: int


def describe_ref(tree: RefTree) -> str:
    return f"`{tree.ref}` = {tree.sha[:12]}" if tree.label != tree.sha[:12] else tree.sha[:12]


def section(run: Run, names: Sequence[str], rounds: Sequence[Mapping[str, Budget]], ref: RefTree) -> str:
    """The CPU-budget section of RESULTS.md: before (``ref``) and after (the current tree) per target."""
    before_label, after_label = f"before ({ref.label})", "after"
    flagged = flagged_rounds(rounds)
    parts = [
        CPU_BUDGET[0],
        "## CPU budget (`make bench-budget`)",
        "",
        "Where a request's CPU goes (issue #16): µs of the proxy's CPU per request by stage, **before** the "
        f"performance work of #16 ({describe_ref(ref)}, the commit before its first one) and **after** it (the "
        "current tree), measured in the same run, interleaved. Medians over the rounds (so the stage rows need "
        "not add up to the total exactly); the total with its min-max. Only a same-run comparison means anything "
        "on this machine: its speed drifts by more than the differences measured here.",
        "",
        f"- date: {run.started:%Y-%m-%d %H:%M} UTC ({run.minutes:.1f} min)",
        f"- machine: {run.info['nproc']} CPUs, {run.info['cpu']}, Linux {run.info['kernel']}",
        f"- versions: {run.info['versions']}",
        f"- after: commit {run.info['commit']}; before: {describe_ref(ref)} (a git worktree run with the same "
        "interpreter, benchmarks/refs.py)",
        f"- commands: `make bench-budget` = `{run.command}`",
        f"- load: wrk -t1 -c{run.connections}, {run.duration:g} s per measurement, two per target per round (one "
        f"unsampled, one sampled by `py-spy record --native --rate {run.rate}`), {run.rounds} rounds with both "
        "trees' targets interleaved, every other round in reverse order; the proxy on CPU 1, wrk and the backends "
        "(one nginx, 3 `return 200` servers) on CPU 0; the config of `make bench`",
        f"- load average before / after: {run.load[0]} / {run.load[1]}",
        f"- flagged rounds (other work above {OTHER_CPU_LIMIT:g} cores during a measurement; kept in the figures): "
        + (", ".join(str(i + 1) for i in flagged) or "none"),
        "",
        *([f"> **{len(flagged)} of {len(rounds)} rounds are flagged**: the machine was not quiet. Run it again "
           "before quoting these figures.", ""] if flagged else []),
    ]
    readings = []
    columns = [n for name in names for n in (f"{name}@{ref.label}", name)]
    for name in names:
        after_name, before_name = name, f"{name}@{ref.label}"
        before = Figures.of([r[before_name] for r in rounds if before_name in r])
        after = Figures.of([r[after_name] for r in rounds if after_name in r])
        ratio = same_round_ratio(rounds, after_name, before_name)
        errors = before.errors + after.errors
        parts += [f"### {TITLES.get(name, name)}", "",
                  figures_table([(before_label, before), (after_label, after)]), "",
                  f"After ÷ before, total µs per request taken in the same round: "
                  f"{ratio.cell('.2f') if ratio else '-'}. Requests measured: {before.requests:,} before, "
                  f"{after.requests:,} after; samples {before.samples:,} and {after.samples:,}"
                  + (f"; **{errors} errors**" if errors else "; no errors") + ".", ""]
        readings.append(f"- {name}: {reading(before, after, ratio)}")
    parts += [
        "### How it is measured",
        "",
        "Per target and round, wrk loads the proxy twice. The first run is not sampled: the proxy's utime and stime "
        "(/proc/<pid>/stat) over the run, divided by wrk's request count, give its user and kernel µs per request. "
        "The *syscalls* row is that kernel time as the kernel accounted it. The user time is split over the stages "
        "by the shares of the second run's py-spy samples (`--native`, so C frames of uvloop, libuv, httptools and "
        "OpenSSL are seen), leaving out the samples that stand in a libc system-call wrapper: py-spy stops the "
        "process to sample it, which over-weights stacks inside system calls. A sample goes to the stage of its "
        "innermost frame that a rule names (`STAGE_RULES` in benchmarks/cpu_budget.py), so the cookie's HMAC "
        "called from the routing decision counts as *cookie*. The rules cover both trees: the fast engine in "
        "`engines/fast/` (after) or `fastpath/` (before), the engine-neutral parts in `proxy/` and `routing/` "
        "(after) or `web/`, `forwarding/` and `routing/` (before).",
        "",
        "- *parse*: request framing and heads, httptools/llhttp (`head`, `wire`, `framing`, `RequestFraming`)",
        "- *decide*: the routing decision and its inputs (`routing/`, `route`, `mint`, `resolve`, `context`, `act`, "
        "`fly`, `placement/`, `pins/`, `membership/`, uhashring)",
        "- *cookie*: the signed cookie: parsing, HMAC-SHA256, base64",
        "- *rewrite*: the header blocks both ways (`rewrite`, `headers`, `realip`)",
        "- *pool*: upstream connections and their protocol (`upstream`, `pool`, `lane`)",
        "- *write*: the response head (`ResponseHead`, `response`) and transport writes (uvloop's `write`)",
        "- *exchange*: the per-request driver (`exchange`, `forward`, `forward_lane`, `protocol`, `hot`, `closing`, "
        "`counting`, `server`)",
        "- *metrics*: prometheus_client and `observability/`",
        "- *event loop*: uvloop, libuv and asyncio frames with no proxy code inside",
        "- *other*: samples no rule names (interpreter start-up frames, GC, the stdlib outside these)",
        "",
        "### Reading",
        "",
        *readings,
        "",
        "<details><summary>Every round: total µs per request, and the most other work took meanwhile</summary>",
        "",
        _markdown(["round", *columns, "other CPU (cores)"],
                  [[f"{i + 1}{' (flagged)' if i in flagged else ''}",
                    *(f"{r[n].us_per_request:.1f}" if n in r else "-" for n in columns),
                    f"{max((b.other_cpu or 0.0) for b in r.values()):.2f}"] for i, r in enumerate(rounds)]),
        "",
        "</details>",
        CPU_BUDGET[1],
    ]
    return "\n".join(parts)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_budget", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each wrk run (5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per target first (2)")
    ap.add_argument("--rate", type=int, default=400, help="py-spy samples per second (400)")
    ap.add_argument("--target", action="append", choices=("affinity-proxy", "affinity-fly", "affinity-new",
                                                          "affinity-aiohttp"),
                    help=f"a make-bench target (repeatable; default {' and '.join(TARGETS)})")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--compare-ref", metavar="REF", type=check_ref_syntax,
                    help=f"also measure REF's proxy in the same rounds (make bench-budget: {BEFORE_REF})")
    ap.add_argument("--write", action="store_true",
                    help="write the before/after section of benchmarks/RESULTS.md (needs --compare-ref)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the file --write writes into")
    ap.add_argument("--verbose", action="store_true", help="print the frames of the samples no stage rule names")
    ap.add_argument("--output", type=Path, help="also write the tables to this file")
    args = ap.parse_args(argv)
    args.target = list(dict.fromkeys(args.target or TARGETS))
    if args.write and not args.compare_ref:
        ap.error("--write needs --compare-ref (the section has a before and an after column)")
    if not 1 <= args.rounds <= 20 or not 1 <= args.duration <= 120:
        ap.error("--rounds 1..20, --duration 1..120")
    return args


def print_others(name: str, budgets: Sequence[Budget], top: int = 12) -> None:
    others: Counter[str] = sum((b.others for b in budgets), Counter())
    total = sum(sum(b.per_stage.values()) for b in budgets)
    counts = ", ".join(f"{sum(b.per_stage.get(s, 0) for b in budgets)} in {s!r}" for s in CATCH_ALL)
    print(f"\n{name}: of {total} samples {counts}; their top frames (inner <- caller):")
    for frame, n in others.most_common(top):
        print(f"  {n:6} {100 * n / max(1, total):5.1f} %  {frame[:200]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.cpu_budget " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    nginx_bin, wrk_bin, _ = ensure_tools(install=True, haproxy=False)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise HarnessError("py-spy is needed: pip install py-spy")
    tools = Tools(wrk_bin, py_spy, args.rate, args.duration, args.connections)
    info = machine_info(nginx_bin, wrk_bin, None)
    started, t0, load0 = dt.datetime.now(dt.UTC), time.monotonic(), loadavg()
    worktrees = Worktrees()
    try:
        refs = [worktrees.add(args.compare_ref)] if args.compare_ref else []
        with tempfile.TemporaryDirectory(prefix="affinity-budget-") as tmp:
            work = Path(tmp)
            work.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
            procs = Processes(work)
            try:
                targets = start_targets(procs, nginx_bin=nginx_bin, target_cpu=1, backend_cpu=0, only=args.target,
                                        refs=refs)
                targets = [t for t in targets if split_target_name(t.name)[0] in args.target]
                rounds = run_rounds(targets, procs, tools, work, args.rounds, args.warmup)
            finally:
                left = procs.finish()
    except RefError as exc:
        raise HarnessError(str(exc)) from None
    finally:
        worktrees.remove_all()
    texts = []
    for name in args.target:
        columns = [(f"{name}@{t.label}", Figures.of([r[f"{name}@{t.label}"] for r in rounds])) for t in refs]
        columns.append((name, Figures.of([r[name] for r in rounds])))
        texts.append(f"{name}, median of {args.rounds} round(s)\n\n{figures_table(columns)}")
        if refs:
            ratio = same_round_ratio(rounds, name, f"{name}@{refs[0].label}")
            texts[-1] += f"\n\nafter ÷ before, same round: {ratio.cell('.2f') if ratio else '-'}"
    print("\n\n".join(texts))
    if args.verbose:
        for t in targets:
            print_others(t.name, [r[t.name] for r in rounds])
    if args.output:
        args.output.write_text("\n\n".join(texts) + "\n")
    if args.write and refs:
        run = Run(command, started, (time.monotonic() - t0) / 60, info, (load0, loadavg()), args.rounds,
                  args.duration, args.rate, args.connections)
        write_section(section(run, args.target, rounds, refs[0]), args.results, CPU_BUDGET)
        print(f"wrote the CPU-budget section of {args.results}")
    if flagged := flagged_rounds(rounds):
        print(f"warning: {len(flagged)} of {len(rounds)} rounds flagged (other work above {OTHER_CPU_LIMIT:g} cores "
              "during a measurement): the machine was not quiet; do not quote this run", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    run_main(main)
