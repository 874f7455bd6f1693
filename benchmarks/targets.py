"""The processes of a benchmark run: backends, the targets, and their clean stop by PID.

``Processes`` starts every process (pinned with ``taskset``, output to a log in the run's temp
directory), remembers its PID and its children's, and stops them all by PID (SIGTERM, then SIGKILL
after a grace period); ``leftovers()`` is the final check that nothing it started survives.
``start_targets`` brings up the backends and the targets and returns how to load each one.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.client
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from affinity_proxy.devtools.ports import free_port
from benchmarks import haproxy, nginx
from benchmarks.refs import SEPARATOR, RefTree, check_imports_from, split_target_name
from benchmarks.rounds import NEW_SESSION_REFERENCE, REFERENCE

COOKIE = "fly-instance-id"
USER_HEADER = "X-User-Id"
USER = "bench-user"
BACKEND_IDS = ("app-1", "app-2", "app-3")
#: Every target, in table order: pinned sessions (against nginx-proxy), then new sessions (against
#: haproxy-insert).
ALL_TARGETS = ("nginx-proxy", "direct", "byte-relay", "affinity-proxy", "affinity-aiohttp", "affinity-fly",
               "affinity-fly-aiohttp", "naive-aiohttp", "haproxy-insert", "affinity-new")
FLY_IDS = ("m1", "m2", "m3")
START_TIMEOUT = 20.0
STOP_GRACE = 10.0

Headers = list[tuple[str, str]]


class HarnessError(RuntimeError):
    """A process did not start or answer as expected."""


def file_stem(name: str) -> str:
    """A target's name as a file name in the run's directory (``affinity-proxy@release/1`` has a ``/``)."""
    return re.sub(r"[^A-Za-z0-9._@-]", "_", name)


def http_get(
    port: int, path: str = "/", headers: Sequence[tuple[str, str]] = (), timeout: float = 2.0,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One GET to 127.0.0.1:port: ``(status, [(name, value)], body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers))
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def _ppid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _alive(pid: int, starttime: str | None = None) -> bool:
    """True while ``pid`` exists and is not a zombie (and, given ``starttime``, is still the same
    process, not a reused PID)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and (starttime is None or fields[19] == starttime)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (scans /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid(int(entry))
            if ppid is not None:
                parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if _alive(child):
                out.append(child)
                todo.append(child)
    return out


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy so far, over all CPUs (/proc/stat): user, nice, system
    and steal (time a hypervisor gave to someone else is time this run did not get). Not irq and
    softirq: the run's own loopback traffic lands there, and cannot be told apart from others'."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    if fields[0] != "cpu":
        raise HarnessError(f"unexpected /proc/stat first line: {fields[:4]}")
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def softirq_threads() -> list[int]:
    """The kernel's ksoftirqd threads: they carry the run's own loopback traffic when softirqs pile up,
    so their CPU counts as the run's, not as other work."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue  # the process ended while we listed /proc
            if comm.startswith("ksoftirqd/"):
                out.append(int(entry))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` so far (processes that are gone count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    children: dict[int, str] = field(default_factory=dict)  # pid -> starttime, every child ever seen

    def pids(self) -> list[int]:
        """The process and its live children (nginx's worker), for CPU accounting; remembers the
        children so that they can be checked after the parent is gone."""
        for pid in descendants(self.proc.pid):
            fields = _stat(pid)
            if fields is not None:
                self.children.setdefault(pid, fields[19])
        return [self.proc.pid, *(p for p, t in self.children.items() if _alive(p, t))]

    def orphans(self) -> list[int]:
        """Children still alive (normally none once the parent has stopped)."""
        return [p for p, t in self.children.items() if _alive(p, t)]

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class Processes:
    """Every process the harness starts, stopped by PID at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Started] = []
        # Not ours to stop: what already ran below this process (a test's own redis-server, say).
        self._before = set(descendants(os.getpid()))

    def start(self, name: str, argv: Sequence[str], *, cpu: int | None, env: dict[str, str] | None = None) -> Started:
        log = self.workdir / f"{file_stem(name)}.log"
        full = (["taskset", "-c", str(cpu)] if cpu is not None else []) + list(argv)
        with log.open("wb") as out:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.workdir, start_new_session=True)
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def stop_all(self) -> list[str]:
        """SIGTERM every process (newest first), SIGKILL what outlives the grace period, and the
        same for children left behind. Returns what needed SIGKILL."""
        notes: list[str] = []
        for s in self.started:
            if s.proc.poll() is None:
                s.pids()  # remember the children before the parent goes
        for s in reversed(self.started):
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for s in reversed(self.started):
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                notes.append(f"{s.name} (pid {s.proc.pid}) ignored SIGTERM: killed")
                s.proc.kill()
                s.proc.wait(timeout=5)
        deadline = time.monotonic() + 2.0  # a worker may take a moment to exit after its master
        while any(s.orphans() for s in self.started) and time.monotonic() < deadline:
            time.sleep(0.05)
        for s in self.started:
            for pid in s.orphans():
                notes.append(f"{s.name} child pid {pid} outlived its parent: killed")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return notes

    def finish(self) -> list[str]:
        """Stop everything (``stop_all``), say so, and return what is still running (``leftovers``)."""
        for note in self.stop_all():
            print(f"warning: {note}", file=sys.stderr)
        left = self.leftovers()
        if left:
            print(f"error: processes left running: {', '.join(left)}", file=sys.stderr)
        else:
            print(f"stopped all {len(self.started)} processes by PID; none left", flush=True)
        return left

    def all_pids(self) -> list[int]:
        """Every live process started here and its children (for the run's own CPU use)."""
        return [pid for s in self.started if s.proc.poll() is None for pid in s.pids()]

    def leftovers(self) -> list[str]:
        """The final check: processes started here (or below this process) still alive."""
        left = [f"{s.name} pid {s.proc.pid}" for s in self.started if s.proc.poll() is None]
        left += [f"{s.name} child pid {p}" for s in self.started for p in s.orphans()]
        left += [f"descendant pid {p}" for p in descendants(os.getpid()) if p not in self._before]
        return left


def wait_ready(started: Started, port: int, path: str = "/", timeout: float = START_TIMEOUT) -> None:
    """Until ``GET path`` on ``port`` answers (any status), or the process exits, or ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise HarnessError(f"{started.name} exited with {started.proc.returncode}:\n{started.log_tail()}")
        try:
            http_get(port, path, timeout=1.0)
            return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise HarnessError(f"{started.name} did not answer on 127.0.0.1:{port} within {timeout:.0f}s ({last}):\n"
                       f"{started.log_tail()}")


@dataclass
class Target:
    """One thing wrk loads. ``headers()`` is called before every run (fresh affinity cookies: a
    cookie older than ``cookie.revalidate_after`` would send the proxy to the pin store)."""

    name: str
    what: str
    port: int
    processes: list[Started]
    headers: Callable[[], Headers]
    expected_status: int | None = None  # None: any 2xx/3xx
    reference: str = REFERENCE  # the target its ratios are taken against

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def pids(self) -> list[int]:
        return [pid for s in self.processes for pid in s.pids()]


def _proxy_yaml(
    listen: int, admin: int, secret: str, instances: Sequence[tuple[str, int]], fly_upstream: int | None,
    engine: str = "fast",
) -> str:
    """The affinity-proxy config: proxy mode over ``instances``, or (``fly_upstream`` given) a fly
    node whose Machine is the first instance, forwarding to ``fly_upstream``; ``engine`` is the
    main listener's HTTP server (aiohttp or fast)."""
    lines = [
        f"mode: {'fly' if fly_upstream is not None else 'proxy'}",
        f"engine: {engine}",
        f'listen: "127.0.0.1:{listen}"',
        f'admin_listen: "127.0.0.1:{admin}"',
        "instances:",
        *(f"  - {{id: {i}, url: 'http://127.0.0.1:{p}'}}" for i, p in instances),
        "cookie:",
        f"  name: {COOKIE}",
        f"  secret: {secret}",
        "user_key:",
        f"  - header: {USER_HEADER}",
        "store:",
        "  url: memory://",
        "log:",
        "  level: WARNING",
    ]
    if fly_upstream is not None:
        lines += [
            "fly:",
            "  app: bench",
            f"  machine_id: {instances[0][0]}",
            f"  upstream: http://127.0.0.1:{fly_upstream}",
            "  discovery: static",
        ]
    return "\n".join(lines) + "\n"


def _cookie_from(headers: Sequence[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if name.lower() == "set-cookie" and value.startswith(COOKIE + "="):
            return value.split(";", 1)[0].split("=", 1)[1]
    return None


def proxy_mode_headers(port: int) -> Headers:
    """A pinned user's headers, with the affinity cookie the proxy itself issued for them; checked
    to be trusted as is (200, no Set-Cookie on the next request)."""
    user = [(USER_HEADER, USER)]
    status, headers, body = http_get(port, "/", user)
    value = _cookie_from(headers)
    if status != 200 or value is None:
        raise HarnessError(f"affinity-proxy gave {status} without a {COOKIE} cookie: {headers} {body[:200]!r}")
    out = [("Cookie", f"{COOKIE}={value}"), *user]
    status, headers, body = http_get(port, "/", out)
    if status != 200 or _cookie_from(headers) is not None:
        raise HarnessError(f"affinity-proxy did not accept its own cookie: {status} {headers} {body[:200]!r}")
    return out


def fly_mode_headers(port: int, secret: str, instance: str) -> Headers:
    """A user pinned to another Machine (``instance``): a cookie signed with the node's secret,
    checked to be answered with a replay to that Machine."""
    from affinity_proxy.routing.cookie import CookieCodec
    from affinity_proxy.routing.model import InstanceId

    codec = CookieCodec(secret)
    value = codec.encode(InstanceId(instance), int(time.time()), codec.user_digest(USER))
    out = [("Cookie", f"{COOKIE}={value}"), (USER_HEADER, USER)]
    status, headers, body = http_get(port, "/", out)
    replay = dict((k.lower(), v) for k, v in headers).get("fly-replay", "")
    if status != 409 or f"instance={instance}" not in replay or _cookie_from(headers) is not None:
        raise HarnessError(f"fly node did not replay to {instance}: {status} {headers} {body[:200]!r}")
    return out


def new_session_headers(port: int) -> Headers:
    """No cookie and no user key: a first visit. Checked to be answered 200 with a freshly set
    affinity cookie, so that every request of the run makes the target pick an instance and mint one."""
    status, headers, body = http_get(port, "/")
    if status != 200 or _cookie_from(headers) is None:
        raise HarnessError(f"a request without a cookie on port {port} got {status} without a {COOKIE} cookie: "
                           f"{headers} {body[:200]!r}")
    return []


def static_headers(value: str) -> Callable[[], Headers]:
    return lambda: [("Cookie", f"{COOKIE}={value}"), (USER_HEADER, USER)]


#: The affinity-proxy processes a run may start: target name, engine, fly mode.
AFFINITY_PROCESSES = (("affinity-proxy", "fast", False), ("affinity-aiohttp", "aiohttp", False),
                      ("affinity-fly", "fast", True), ("affinity-fly-aiohttp", "aiohttp", True))


def proxy_configs(want: Sequence[str], *, ports: Sequence[tuple[int, int]], secret: str,
                  backends: Sequence[tuple[str, int]], fly_upstream: int) -> list[tuple[str, int, str]]:
    """``(base name, listen port, config YAML)`` of every affinity-proxy process the selection ``want`` needs, one
    ``(listen, admin)`` pair from ``ports`` each. The proxy-mode fast engine also serves affinity-new.
    A compared ref gets the very same configs (only the ports differ), so that the comparison
    measures the code and nothing else; a ref whose schema refuses them fails at start, with its log."""
    out = []
    chosen = set(want)
    free = iter(ports)
    for name, engine, fly in AFFINITY_PROCESSES:
        if name not in chosen and not (name == "affinity-proxy" and "affinity-new" in chosen):
            continue
        listen, admin = next(free)
        if fly:
            text = _proxy_yaml(listen, admin, secret, list(zip(FLY_IDS, [p for _, p in backends], strict=True)),
                               fly_upstream, engine)
        else:
            text = _proxy_yaml(listen, admin, secret, backends, None, engine)
        out.append((name, listen, text))
    return out


def start_affinity(
    procs: Processes, want: Sequence[str], *, suffix: str, env: dict[str, str], python: str, target_cpu: int | None,
    secret: str, backends: Sequence[tuple[str, int]], fly_upstream: int,
) -> list[tuple[str, int, Started]]:
    """Start the affinity-proxy processes ``want`` needs (``python -m affinity_proxy serve`` with
    ``env``: the current tree, or a compared ref's), named with ``suffix``; ``(name, port, process)``
    once each answers its health check."""
    ports = [(free_port(), free_port()) for _ in AFFINITY_PROCESSES]
    out = []
    for base, port, text in proxy_configs(want, ports=ports, secret=secret, backends=backends,
                                          fly_upstream=fly_upstream):
        name = base + suffix
        conf = procs.workdir / f"{file_stem(name)}.yaml"
        conf.write_text(text)
        s = procs.start(name, [python, "-m", "affinity_proxy", "serve", "--config", str(conf)], cpu=target_cpu, env=env)
        wait_ready(s, port, "/_affinity/health")
        out.append((name, port, s))
    return out


def start_targets(
    procs: Processes, *, nginx_bin: str, target_cpu: int | None, backend_cpu: int | None,
    python: str = sys.executable, only: Sequence[str] = (), haproxy_bin: str | None = None,
    refs: Sequence[RefTree] = (),
) -> list[Target]:
    """Start the backends and the targets (all of them, or those named in ``only``), and for each of
    ``refs`` a twin ``name@label`` of every selected affinity-proxy target run from that ref's
    worktree; wait until each answers, and return them in table order."""
    work = procs.workdir
    want = set(only) or set(ALL_TARGETS)
    for name in ("backends", "direct", "nginx-proxy"):
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / f"{name}-temp" / sub).mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in BACKEND_IDS]
    backends = list(zip(BACKEND_IDS, ports, strict=True))

    def start_nginx(name: str, text: str, cpu: int | None, port: int) -> Started:
        conf = work / f"{name}.conf"
        conf.write_text(text)
        started = procs.start(name, nginx.nginx_argv(nginx_bin, work, conf, name), cpu=cpu)
        wait_ready(started, port)
        return started

    start_nginx("backends", nginx.backend_conf(work, backends), backend_cpu, ports[0])
    targets: list[Target] = []
    if "nginx-proxy" in want:
        port = free_port()
        s = start_nginx("nginx-proxy", nginx.proxy_conf(work, port, ports, cookie_name=COOKIE), target_cpu, port)
        targets.append(Target("nginx-proxy", "nginx 1 worker, hash $cookie consistent, keepalive 64", port, [s],
                              static_headers("bench-cookie")))
    if "direct" in want:
        port = free_port()
        s = start_nginx("direct", nginx.backend_conf(work, [(BACKEND_IDS[0], port)], name="direct"), target_cpu, port)
        targets.append(Target("direct", "one nginx backend, no proxy", port, [s], static_headers("bench-cookie")))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), LOG_LEVEL="WARNING")
    if "byte-relay" in want:
        port = free_port()
        s = procs.start("byte-relay", [python, "-m", "benchmarks.byte_relay", "--listen", f"127.0.0.1:{port}",
                                       "--upstream", f"127.0.0.1:{ports[0]}"], cpu=target_cpu, env=env)
        wait_ready(s, port)
        targets.append(Target("byte-relay", "the Python ceiling: asyncio + uvloop, one upstream connection per client "
                                            "connection, bytes copied both ways, no HTTP parsing", port, [s],
                              static_headers("bench-cookie")))
    secret = secrets.token_hex(32)
    new_session_targets: list[Target] = []
    # The current tree, then every compared ref (``name@label``), each with the same configs.
    trees: list[tuple[str, dict[str, str], RefTree | None]] = [("", env, None)]
    trees += [(SEPARATOR + t.label, dict(t.env(), LOG_LEVEL="WARNING"), t) for t in refs]
    for suffix, tree_env, tree in trees:
        at = f" at {tree.label} ({tree.sha[:12]})" if tree else ""
        if tree is not None:
            check_imports_from(tree, python)
        started = start_affinity(procs, want, suffix=suffix, env=tree_env, python=python, target_cpu=target_cpu,
                                 secret=secret, backends=backends, fly_upstream=ports[0])
        for name, port, s in started:
            base = name.removesuffix(suffix)
            if base in ("affinity-proxy", "affinity-aiohttp"):
                engine = "fast" if base == "affinity-proxy" else "aiohttp"
                targets.append(Target(name, f"proxy mode, engine {engine}, memory store, signed cookie, 3 backends"
                                            f"{at}", port, [s], functools.partial(proxy_mode_headers, port)))
            elif base in ("affinity-fly", "affinity-fly-aiohttp"):
                engine = "fast" if base == "affinity-fly" else "aiohttp"
                targets.append(Target(name, f"fly mode node {FLY_IDS[0]}, engine {engine}, cookie pinned to "
                                            f"{FLY_IDS[1]}: 409 replays{at}", port, [s],
                                      functools.partial(fly_mode_headers, port, secret, FLY_IDS[1]),
                                      expected_status=409))
        if "affinity-new" in want:
            port, s = next((p, s) for n, p, s in started if n == "affinity-proxy" + suffix)
            new_session_targets.append(Target(
                "affinity-new" + suffix, "new sessions: the affinity-proxy (fast engine) process, no cookie and no "
                f"user key sent: picks an instance and mints a signed cookie{at}", port, [s],
                functools.partial(new_session_headers, port), reference=NEW_SESSION_REFERENCE))
    if "naive-aiohttp" in want:
        port = free_port()
        s = procs.start("naive-aiohttp", [python, "-m", "benchmarks.naive_proxy", "--listen", f"127.0.0.1:{port}",
                                          "--upstream", f"http://127.0.0.1:{ports[0]}"], cpu=target_cpu, env=env)
        wait_ready(s, port)
        targets.append(Target("naive-aiohttp", "aiohttp server + one ClientSession, one backend", port, [s],
                              static_headers("bench-cookie")))
    if "haproxy-insert" in want:
        if haproxy_bin is None:
            raise HarnessError("the haproxy-insert target needs haproxy (apt-get install -y haproxy)")
        port = free_port()
        conf = work / "haproxy-insert.cfg"
        conf.write_text(haproxy.insert_conf(port, backends, cookie_name=COOKIE))
        s = procs.start("haproxy-insert", haproxy.haproxy_argv(haproxy_bin, conf), cpu=target_cpu)
        wait_ready(s, port)
        targets.append(Target("haproxy-insert", "new sessions: HAProxy 1 thread, roundrobin, `cookie ... insert "
                                                "indirect nocache httponly`, no cookie sent", port, [s],
                              functools.partial(new_session_headers, port), reference=NEW_SESSION_REFERENCE))
    targets += new_session_targets
    # Table order: ALL_TARGETS, each ref's twin right after its target (a stable sort keeps the refs' order).
    targets.sort(key=lambda t: ALL_TARGETS.index(split_target_name(t.name)[0]))
    for t in targets:  # every target answers as expected before any load
        status, _, body = http_get(t.port, "/", t.headers())
        if status != (t.expected_status or 200):
            raise HarnessError(f"{t.name} answered {status}: {body[:200]!r}")
    return targets


def run_main(main: Callable[[], int]) -> NoReturn:
    """A harness's ``__main__``: exit with ``main()``'s code; a ``HarnessError`` or Ctrl-C exits
    with a one-line message (every process was stopped by then: ``Processes.finish``)."""
    try:
        raise SystemExit(main())
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        raise SystemExit(130) from None
