"""Loads of ``benchmarks.scaling``'s proxy-memory part: ``total`` requests spread over ``users``
distinct user keys (the ``X-User-Id`` header, a ``user_key:`` source of the proxy's config).

Why two clients: wrk with a Lua script is several times faster than any Python client, so it is
used when installed; the aiohttp client is the fallback (CI has no wrk) and gives the same requests.
Both cycle user ids ``0..users-1`` so exactly ``users`` distinct keys are sent (a request in flight
when the total is reached repeats a key, never adds one), keep no cookies (each request is a user's
first, as for a crowd of new visitors), and stop after ``total`` responses or their time bound.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.scaling_common import USER_DIGITS, USER_HEADER, USER_PREFIX, user_key
from benchmarks.wrk import WrkParseError

USERS_LUA = f"""\
-- benchmarks/scaling_load.py: `total` requests from `users` distinct {USER_HEADER} values, then stop
local threads = {{}}
local users, total, marker, offset, sent, received = 1, 1, nil, 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  users = tonumber(args[1])
  total = tonumber(args[2])
  marker = args[3]
  offset = tonumber(args[4] or "0")
  statuses = {{}}
end

function request()
  local id = offset + sent % users
  sent = sent + 1
  return wrk.format("GET", "/", {{["{USER_HEADER}"] = string.format("{USER_PREFIX}%0{USER_DIGITS}d", id)}})
end

function response(status, headers, body)
  received = received + 1
  statuses[status] = (statuses[status] or 0) + 1
  if received == total then
    -- wrk's main thread sleeps for -d whatever the threads do: tell the caller to SIGINT it
    local f = io.open(marker, "w")
    f:write("done\\n")
    f:close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do
      io.write(string.format("status %d %d\\n", code, n))
    end
  end
end
"""

_STATUS = re.compile(r"^status (\d{3}) (\d+)\s*$", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class LoadResult:
    client: str
    requests: int  # responses received
    errors: int  # socket errors and non-200 responses
    seconds: float


def bound_seconds(total: int) -> int:
    """The time bound of a load of ``total`` requests: generous (200 req/s), capped at 10 min."""
    return int(min(600, max(10, total / 200)))


def parse_users_output(text: str) -> tuple[int, int]:
    """(responses, errors) from wrk's output with USERS_LUA's status lines."""
    statuses: dict[int, int] = {}
    for code, n in _STATUS.findall(text):
        statuses[int(code)] = statuses.get(int(code), 0) + int(n)
    if not statuses:
        raise WrkParseError(f"no status lines in wrk's output:\n{text[-2000:]}")
    sock = _SOCKET.search(text)
    socket_errors = sum(map(int, sock.groups())) if sock else 0
    return sum(statuses.values()), socket_errors + sum(n for c, n in statuses.items() if c != 200)


def load_wrk(wrk_bin: str, script: Path, port: int, *, users: int, total: int, connections: int,
             offset: int = 0) -> LoadResult:
    """One wrk thread (its Lua counters are per thread) over ``connections`` connections. The script
    writes a marker file after ``total`` responses; then wrk gets SIGINT (its "stop now and report").
    wrk is killed by PID if it outlives its bound."""
    bound = bound_seconds(total)
    marker = script.parent / f"users-done-{time.monotonic_ns()}"
    argv = [wrk_bin, "-t1", f"-c{connections}", f"-d{bound}s", "--timeout=5s", "-s", str(script),
            f"http://127.0.0.1:{port}/", "--", str(users), str(total), str(marker), str(offset)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while proc.poll() is None and time.monotonic() < t0 + bound + 30:
            if marker.exists():
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    if proc.returncode != 0:
        raise WrkParseError(f"wrk exited with {proc.returncode}:\n{out[-2000:]}")
    requests, errors = parse_users_output(out)
    return LoadResult("wrk (1 thread, Lua-generated user headers)", requests, errors, time.monotonic() - t0)


async def _load_aiohttp(port: int, users: int, total: int, connections: int, offset: int = 0) -> LoadResult:
    url = f"http://127.0.0.1:{port}/"
    counter = iter(range(total))
    done = errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=5)
    t0 = time.monotonic()
    deadline = t0 + bound_seconds(total)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=timeout) as session:

        async def worker() -> None:
            nonlocal done, errors
            for i in counter:
                if time.monotonic() > deadline:
                    return
                try:
                    async with session.get(url, headers={USER_HEADER: user_key(offset + i % users)}) as resp:
                        await resp.read()
                        errors += resp.status != 200
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                done += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return LoadResult(f"aiohttp ({connections} connections)", done, errors, time.monotonic() - t0)


def load_users(port: int, *, users: int, total: int, connections: int, wrk_bin: str | None,
               script: Path | None, offset: int = 0) -> LoadResult:
    """``total`` requests over ``users`` distinct user keys (ids ``offset..offset+users-1``), with wrk
    when given, else aiohttp."""
    if wrk_bin is not None and script is not None:
        return load_wrk(wrk_bin, script, port, users=users, total=total, connections=connections, offset=offset)
    return asyncio.run(_load_aiohttp(port, users, total, connections, offset))
