"""Shared pieces of ``benchmarks.scaling``: latency summaries, RESP encoding, RSS and CPU readings,
Markdown tables, and starting/stopping redis-server and single processes by PID.

Why a module of its own: the scaling benchmark has three parts (pin store, proxy memory, workers)
that all need these, and the pure functions here (``summarize``, ``resp``, ``md_table``,
``per_unit``) are what the smoke test checks without running any load.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from benchmarks.targets import HarnessError, Processes, Started, free_port

USER_HEADER = "X-User-Id"
USER_PREFIX = "user-"  # user keys are USER_PREFIX + 11 digits: 16 characters, fixed width
USER_DIGITS = 11
STOP_GRACE = 10.0


def user_key(i: int) -> str:
    """The benchmark's i-th user key (fixed width, so every key has the same length)."""
    return f"{USER_PREFIX}{i:0{USER_DIGITS}d}"


# --- latency summaries ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """Latencies of ``n`` operations in milliseconds; ``ops_per_s`` over the wall time of the batch."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int = 0
    ops_per_s: float | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(latencies_ns: Iterable[int], *, wall_s: float | None = None, errors: int = 0) -> Summary:
    values = sorted(v / 1e6 for v in latencies_ns)
    if not values:
        return Summary(0, math.nan, math.nan, math.nan, errors, None)
    rate = len(values) / wall_s if wall_s else None
    return Summary(len(values), percentile(values, 50), percentile(values, 99), sum(values) / len(values), errors,
                   rate)


def ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def per_unit(total: float, units: int) -> float | None:
    return total / units if units > 0 else None


# --- formatting ----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> str:
    """A Markdown table: the first ``left`` columns left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mib(kib: float | None) -> str:
    return fmt(None if kib is None else kib / 1024, ".1f")


# --- Redis protocol and server -------------------------------------------------------------------


def resp(*args: str | int | bytes) -> bytes:
    """One command in RESP (Redis's wire protocol), as ``redis-cli --pipe`` reads it."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def start_redis(procs: Processes, redis_bin: str = "redis-server") -> tuple[Started, int]:
    """A private redis-server on 127.0.0.1 (no persistence), ready to answer PING."""
    port = free_port()
    started = procs.start("redis", [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--protected-mode", "yes"], cpu=None)
    deadline = time.monotonic() + 20
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        while True:
            if started.proc.poll() is not None:
                raise HarnessError(f"redis-server exited with {started.proc.returncode}:\n{started.log_tail()}")
            try:
                if client.ping():
                    return started, port
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise HarnessError(f"redis-server did not answer on port {port}:\n{started.log_tail()}")
            time.sleep(0.05)
    finally:
        client.close()


def redis_pipe(port: int, data: bytes, *, expected: int, timeout: float = 600) -> None:
    """Send ``data`` (RESP commands) with ``redis-cli --pipe``; checks every reply arrived without
    an error. The redis-cli process is killed by PID if anything goes wrong."""
    proc = subprocess.Popen(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "--pipe"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(data, timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    text = out.decode(errors="replace")
    if proc.returncode != 0 or f"errors: 0, replies: {expected}" not in text:
        raise HarnessError(f"redis-cli --pipe: exit {proc.returncode}, expected {expected} replies:\n{text[-1000:]}")


# --- processes -----------------------------------------------------------------------------------


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS (KiB) over ``pids`` (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue
    return total


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def stop(started: Started) -> None:
    """Stop one process by PID (SIGTERM, SIGKILL after a grace period), and any child it left."""
    if started.proc.poll() is None:
        started.pids()  # remember the children first
        started.proc.send_signal(signal.SIGTERM)
        try:
            started.proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            started.proc.kill()
            started.proc.wait(timeout=5)
    deadline = time.monotonic() + 2.0
    while started.orphans() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in started.orphans():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
