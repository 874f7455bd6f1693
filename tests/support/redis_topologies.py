"""Throwaway Redis Cluster (3 masters + 3 replicas) and Sentinel set (1 master, 1 replica,
3 sentinels) on 127.0.0.1, for the pin-store suites.

Why real processes: the claim race, CAS and failover behaviour depend on redis-py's cluster and
Sentinel clients talking to real servers (MOVED, slot maps, master discovery), which no fake models.
Each topology is started once per test session (``tests/conftest.py``); tests empty it with
``flushall()``. Readiness is waited for by polling against bounded deadlines (``cluster_state:ok``
on every node with all slots covered and every replica linked; every sentinel knowing the master,
the replica and the other sentinels), never by fixed sleeps, so a loaded 2-core machine only makes
start-up slower. Binaries: ``redis-server`` (``$REDIS_SERVER_BIN``) and ``redis-cli`` (next to it or
on PATH); sentinels run as ``redis-server --sentinel``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from affinity_proxy.devtools.ports import free_port
from tests.support.redis_server import RedisServerMissing, find_redis_server

READY_TIMEOUT = 90.0  # whole-topology start-up bound on a loaded machine
NODE_TIMEOUT_MS = 2000  # cluster-node-timeout / down-after-milliseconds: failover within seconds
MASTER_NAME = "pins"


def find_redis_cli() -> str:
    server = Path(find_redis_server())
    for candidate in (server.with_name("redis-cli"), shutil.which("redis-cli")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RedisServerMissing("redis-cli not found: it comes with redis-server (apt-get install redis-tools)")


def cluster_ports() -> tuple[int, int]:
    """A node's port and its cluster bus port (``cluster-port``, Redis 7): both from
    ``free_port``, so outside the kernel's ephemeral range and, under pytest-xdist, in this
    worker's own slice (a fixed ``port + 10000`` bus port landed in the ephemeral range, and in
    another worker's picks)."""
    return free_port(dual_stack=False), free_port(dual_stack=False)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``condition`` until true; RuntimeError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)  # poll interval, not a wait for a condition


def _info(port: int, section: str | None = None, *, sentinel: bool = False) -> dict[str, str]:
    """``INFO``/``CLUSTER INFO`` as a dict, {} when the server does not answer."""
    try:
        with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True) as c:
            if section == "cluster":
                return {k: str(v) for k, v in c.cluster("INFO").items()}  # redis-py parses it
            return {k: str(v) for k, v in c.info(section).items()} if section else {}
    except redis.RedisError:
        return {}


class Node:
    """One redis-server (or sentinel) process with its own directory; restartable on its port."""

    def __init__(self, root: Path, port: int, args: list[str], config: str | None = None) -> None:
        self.port = port
        self.dir = root / str(port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        self._args = args
        self._config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        argv = [find_redis_server()]
        if self._config is not None:
            conf = self.dir / "redis.conf"
            if not conf.exists():  # sentinels rewrite their config: keep what they learned
                conf.write_text(self._config)
            argv.append(str(conf))
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--logfile", str(self.log), *self._args]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_for(self.answers, f"redis on port {self.port} to answer PING ({self.tail()})", 20)

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis on port {self.port} exited with {self.proc.returncode}: {self.tail()}")
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """SIGKILL (a crash) with ``kill``, else SIGTERM; waits for the exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-800:]
        except OSError:
            return "(no log yet)"


class RedisClusterSet:
    """``masters`` masters with one replica each, created with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="affinity-cluster-")
        root = Path(self._tmp.name)
        common = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                  "--save", "", "--appendonly", "no"]  # fmt: skip
        self.nodes = []
        for _ in range(2 * masters):
            port, bus = cluster_ports()
            self.nodes.append(Node(root, port, [*common, "--cluster-port", str(bus),
                                                "--cluster-config-file", f"nodes-{port}.conf"]))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        hosts = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run([find_redis_cli(), "--cluster", "create", *hosts, "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=READY_TIMEOUT)
        wait_for(self.healthy, "the cluster to report cluster_state:ok with every replica linked")

    def healthy(self) -> bool:
        """Every running node: state ok, all slots covered; every running replica linked."""
        for node in self.nodes:
            if node.proc is None:
                continue
            info = _info(node.port, "cluster")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            replication = _info(node.port, "replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and _info(n.port, "replication").get("role") == "master"]

    def flushall(self) -> None:
        for node in self.masters():
            with redis.Redis(port=node.port, socket_timeout=5) as client:
                client.flushall()
        # replicas apply FLUSHALL asynchronously; nothing reads them, so no wait is needed

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self._tmp.cleanup()


class RedisSentinelSet:
    """One master, one replica and three sentinels monitoring it as ``MASTER_NAME`` (quorum 2)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="affinity-sentinel-")
        root = Path(self._tmp.name)
        from tests.support.redis_server import free_port

        plain = ["--save", "", "--appendonly", "no"]
        self.master = Node(root, free_port(), plain)
        self.replica = Node(root, free_port(), [*plain, "--replicaof", "127.0.0.1", str(self.master.port)])
        config = (f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                  f"sentinel down-after-milliseconds {MASTER_NAME} {NODE_TIMEOUT_MS}\n"
                  f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                  f"sentinel parallel-syncs {MASTER_NAME} 1\n")  # fmt: skip
        self.sentinels = [Node(root, free_port(), ["--sentinel"], config) for _ in range(3)]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{MASTER_NAME}/0"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for(self.healthy, "every sentinel to know the master, its replica and the other sentinels")

    def _sentinel_view(self, port: int) -> tuple[int | None, int, int]:
        """(master port, replicas, other sentinels) as one sentinel sees them."""
        try:
            with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True) as c:
                addr = c.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
                replicas = c.execute_command("SENTINEL", "replicas", MASTER_NAME)
                others = c.execute_command("SENTINEL", "sentinels", MASTER_NAME)
        except redis.RedisError:
            return None, 0, 0
        return (int(addr[1]) if addr else None), len(replicas), len(others)

    def current_master_port(self) -> int | None:
        for sentinel in self.sentinels:
            if sentinel.proc is not None:
                port, _, _ = self._sentinel_view(sentinel.port)
                if port is not None:
                    return port
        return None

    def healthy(self) -> bool:
        views = [self._sentinel_view(s.port) for s in self.sentinels]
        master = views[0][0]
        if master is None or any(v != (master, 1, 2) for v in views):
            return False
        replica = self.replica if master == self.master.port else self.master
        return _info(replica.port, "replication").get("master_link_status") == "up"

    def flushall(self) -> None:
        port = self.current_master_port()
        assert port is not None, "no sentinel knows the master"
        with redis.Redis(port=port, socket_timeout=5) as client:
            client.flushall()

    def close(self) -> None:
        for node in (*self.sentinels, self.replica, self.master):
            node.stop()
        self._tmp.cleanup()
