"""ProxyMetrics across processes: values written by several workers into one PROMETHEUS_MULTIPROC_DIR
are merged by whichever process renders (counters and histograms summed, ``livesum``/``livemin``
gauges over live workers only, snapshot gauges reported once).

prometheus-client picks its value class at import time, so every multiprocess participant is a
fresh subprocess with the variable set before it starts; the test process itself stays in
single-process mode.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.multiprocess import mark_process_dead

from affinity_proxy.observability.metrics import ProxyMetrics
from tests.functional.helpers import metric_value

ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import json, sys
from affinity_proxy.observability.metrics import ProxyMetrics
spec = json.loads(sys.argv[1])
m = ProxyMetrics()
assert m.multiprocess_dir is not None
m.requests.labels(action="forward", reason="hash").inc(spec["requests"])
m.requests.labels(action="forward", reason="cookie").inc(1)
for _ in range(spec["requests"]):
    m.response(200)
for seconds in spec["observe"]:
    m.upstream_duration.labels(instance="a").observe(seconds)
m.websocket_connections.labels(instance="a").inc(spec["websockets"])
m.store_up.set(spec["store_up"])
print("ready", flush=True)
sys.stdin.readline()
"""

RENDERER = """
import sys
from affinity_proxy.observability.metrics import ProxyMetrics
from affinity_proxy.routing.model import Instance, InstanceId, MembershipView
m = ProxyMetrics()
view = MembershipView.build([Instance(InstanceId("a"), "http://a"), Instance(InstanceId("b"), "http://b")])
m.watch_snapshots(lambda: view, lambda: {"a": 5, "b": 2})
sys.stdout.write(m.render().decode())
"""


def _env(metrics_dir: Path) -> dict[str, str]:
    return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PYTHONPATH": str(ROOT)}


def _render(metrics_dir: Path) -> str:
    done = subprocess.run([sys.executable, "-c", RENDERER], env=_env(metrics_dir), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def _start_writer(metrics_dir: Path, **spec: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(spec)], env=_env(metrics_dir), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    proc.stdout.close()


@pytest.fixture
def writers(tmp_path: Path):  # type: ignore[no-untyped-def]
    procs: list[subprocess.Popen[str]] = []

    def start(**spec: object) -> subprocess.Popen[str]:
        proc = _start_writer(tmp_path, **spec)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_two_workers_are_summed_and_live_gauges_follow_live_workers(tmp_path: Path, writers) -> None:  # type: ignore[no-untyped-def]
    one = writers(requests=3, observe=[0.003, 0.3], websockets=2, store_up=1)
    two = writers(requests=4, observe=[0.02], websockets=1, store_up=0)

    text = _render(tmp_path)
    assert metric_value(text, "affinity_requests_total", {"reason": "hash"}) == 7
    assert metric_value(text, "affinity_requests_total", {"reason": "cookie"}) == 2
    assert metric_value(text, "affinity_responses_total", {"code": "200"}) == 7
    assert metric_value(text, "affinity_upstream_request_duration_seconds_count", {"instance": "a"}) == 3
    assert metric_value(text, "affinity_upstream_request_duration_seconds_sum") == pytest.approx(0.323)
    assert metric_value(text, "affinity_upstream_request_duration_seconds_bucket", {"le": "0.005"}) == 1
    assert metric_value(text, "affinity_upstream_request_duration_seconds_bucket", {"le": "0.025"}) == 2
    assert metric_value(text, "affinity_upstream_request_duration_seconds_bucket", {"le": "+Inf"}) == 3
    assert metric_value(text, "affinity_websocket_connections", {"instance": "a"}) == 3  # livesum
    assert metric_value(text, "affinity_store_up") == 0  # livemin: one live worker cannot reach the store
    # Shared-state gauges come from the renderer's snapshot once, never summed over workers.
    assert metric_value(text, "affinity_pins", {"instance": "a"}) == 5
    assert metric_value(text, "affinity_instances", {"state": "up"}) == 2
    assert sum(1 for line in text.splitlines() if line.startswith("affinity_pins{")) == 2
    assert "affinity_store_up{" not in text  # one merged sample, no per-pid series
    promtool = shutil.which("promtool")  # optional: CI has it
    if promtool is not None:
        linted = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert linted.returncode == 0, linted.stdout + linted.stderr

    _finish(two)
    mark_process_dead(two.pid, str(tmp_path))  # what the supervisor does when a worker exits
    text = _render(tmp_path)
    assert metric_value(text, "affinity_requests_total", {"reason": "hash"}) == 7  # totals survive the worker
    assert metric_value(text, "affinity_upstream_request_duration_seconds_count") == 3
    assert metric_value(text, "affinity_websocket_connections", {"instance": "a"}) == 2
    assert metric_value(text, "affinity_store_up") == 1
    _finish(one)


def test_single_process_mode_without_the_variable() -> None:
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics = ProxyMetrics()
    assert metrics.multiprocess_dir is None
    metrics.requests.labels(action="forward", reason="hash").inc()
    text = metrics.render().decode()
    assert metric_value(text, "affinity_requests_total", {"reason": "hash"}) == 1
    assert metric_value(text, "affinity_store_up") == 1
    assert "affinity_requests_created" in text  # the in-process exposition, as before
