"""Where a request's CPU goes (issue #16): µs per request by stage, from py-spy samples under wrk load.

    python -m benchmarks.cpu_budget [--duration 10] [--target affinity-proxy] [--rate 400] [--output F]

Starts the same backends and affinity-proxy process as ``make bench`` (proxy mode, fast engine,
pinned to CPU 1 with taskset; wrk and the backends on CPU 0) and loads it with wrk twice: once
alone, to read its CPU time per request from /proc (utime and stime over the run, divided by wrk's
request count), and once while ``py-spy record --native`` samples it. Kernel time (stime) is the
``syscalls`` row as measured; user time is split by the share of the samples taken outside system
calls whose stack falls in each stage. A sample goes to the innermost frame that matches a stage
rule (so the cookie HMAC inside ``decide`` counts as cookie); samples that match no rule are
``other``. py-spy stops the process to sample it, which over-weights stacks inside system calls:
that is why the kernel row comes from the kernel's own accounting and not from samples.

Needs py-spy (``pip install py-spy``; ptrace as root or with ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import wrk
from benchmarks.run import ensure_tools
from benchmarks.targets import HarnessError, Processes, run_main, start_targets

OTHER = "other"
SYSCALLS = "syscalls"

#: (stage, frame pattern): the first pattern in this order that the *innermost-first* walk of a
#: stack meets names the stage. Frames look like ``function (path/to/file.py:line)`` for Python and
#: ``symbol (library.so)`` for native code.
STAGE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((stage, re.compile(pattern)) for stage, pattern in (
    # the libc wrappers of system calls (their kernel time is measured, not sampled: see Budget)
    (SYSCALLS, r"^(send|recv|sendmsg|recvmsg|sendto|recvfrom|writev|readv|write|read|epoll_pwait|epoll_wait|"
               r"epoll_ctl|accept4|accept|close|shutdown|setsockopt|getsockopt|__libc_\w+|syscall) \(libc"),
    ("cookie", r"(routing/cookie|hmac|_hashlib|hashlib|HMAC|EVP_|SHA256|sha256|base64|binascii)"),
    # classes that share a module with another stage's code (engines/fast/protocol.py, route.py, rewrite.py)
    ("parse", r"^RequestFraming\."),
    ("exchange", r"^HotRoutes?\."),
    ("write", r"^(ResponseHead|ResponseCache)\."),
    ("decide", r"(routing/|proxy/act\.py|proxy/resolve\.py|proxy/context\.py|proxy/fly\.py|membership/|"
               r"engines/fast/(route|mint)\.py)"),
    ("rewrite", r"(engines/fast/rewrite\.py|proxy/headers\.py|proxy/realip\.py)"),
    ("parse", r"(engines/fast/(head|wire)\.py|llhttp|httptools|_http_parser)"),
    ("pool", r"(engines/fast/(upstream|lane|ports)\.py)"),
    ("write", r"(transport.*write|write \(|writelines \()"),
    ("exchange", r"engines/fast/(counting|closing|exchange|protocol|server|handoff)\.py"),
    ("event loop", r"(uvloop|loop\.cpython|asyncio/|libuv|uv_run|uv__|\((loop|core|linux|stream|handles|"
                   r"timer|tcp|poll)\.c:)"),
    ("metrics", r"(prometheus_client|observability/)"),
))


@dataclass(frozen=True, slots=True)
class Budget:
    """µs of CPU per request, per stage, and what they come from."""

    requests: int  # of the unsampled run
    user_seconds: float
    sys_seconds: float
    per_stage: dict[str, int]  # samples per stage (the syscalls stage included)

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


def parse_collapsed(lines: Iterable[str]) -> Counter[str]:
    """Samples per stage from py-spy's raw (collapsed stack) output: ``f1;f2;f3 count`` per line."""
    out: Counter[str] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        out[stage_of(frames)] += int(count)
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


def measure(duration: float, rate: int, target_name: str, connections: int, workdir: Path) -> Budget:
    nginx_bin, wrk_bin, _ = ensure_tools(install=True, haproxy=False)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise HarnessError("py-spy is needed: pip install py-spy")
    procs = Processes(workdir)
    try:
        targets = start_targets(procs, nginx_bin=nginx_bin, target_cpu=1, backend_cpu=0, only=[target_name])
        target = next(t for t in targets if t.name == target_name)
        headers = target.headers()
        pids = target.pids()
        argv = wrk.wrk_argv(wrk_bin, target.url, duration=2, connections=connections, headers=headers, cpu=0)
        wrk.run_wrk(argv, duration=2)  # warm-up
        argv = wrk.wrk_argv(wrk_bin, target.url, duration=duration, connections=connections, headers=headers, cpu=0)
        user0, sys0 = user_sys_seconds(pids)
        result, _ = wrk.run_wrk(argv, duration=duration)
        user1, sys1 = user_sys_seconds(pids)
        out = workdir / "stacks.txt"
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pids[0]), "--rate", str(rate), "--format", "raw",
                                "--native", "--duration", str(int(duration) + 1), "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        wrk.run_wrk(argv, duration=duration)
        _, err = spy.communicate(timeout=duration + 30)
        if not out.exists():
            raise HarnessError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        if os.environ.get("BUDGET_KEEP"):
            shutil.copy(out, os.environ["BUDGET_KEEP"])
        stages = parse_collapsed(out.read_text().splitlines())
        return Budget(result.requests, user1 - user0, sys1 - sys0, dict(stages))
    finally:
        procs.finish()


def table(budget: Budget, label: str) -> str:
    order = [s for s, _ in STAGE_RULES] + [OTHER]
    rows = [f"| stage | µs/request ({label}) | share |", "|---|---:|---:|"]
    for stage in order:
        n = budget.per_stage.get(stage, 0)
        share = budget.stage_us(stage) / max(1e-9, budget.us_per_request)
        how = "kernel time" if stage == SYSCALLS else f"{n} samples"
        rows.append(f"| {stage} | {budget.stage_us(stage):.1f} | {100 * share:.0f} % ({how}) |")
    rows.append(f"| **total** | **{budget.us_per_request:.1f}** | {budget.requests} requests |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    ap.add_argument("--target", default="affinity-proxy", help="a make-bench target name (affinity-proxy, "
                    "affinity-fly, affinity-new, affinity-aiohttp)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--label", default=os.environ.get("BUDGET_LABEL", "now"))
    ap.add_argument("--output", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="affinity-budget-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        budget = measure(args.duration, args.rate, args.target, args.connections, work)
    text = table(budget, args.label)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
