"""Every Prometheus metric of the README ("Metrics"), registered on a registry passed in (never the global one).

Label values come from the routing enums (``DecisionReason``, ``RepinReason``, ``InstanceState``) so a
typo cannot create a new series. Gauges that describe shared state (pins per instance, instances
per state) are refreshed by a collector callback from the latest membership snapshot and pin counts,
so a scrape never does store I/O on the request path.

Multi-worker (``serve --workers N``): when the process was started with ``PROMETHEUS_MULTIPROC_DIR``
set (the supervisor does it before a worker imports prometheus-client, which picks its value class
at import), every counter, histogram and gauge value is written to per-process files in that
directory and ``render()`` merges the files of all workers with prometheus-client's
``MultiProcessCollector``: counters and the histogram are summed (a dead worker's totals stay in),
``affinity_websocket_connections`` is ``livesum`` (open sockets of live workers) and
``affinity_store_up`` is ``livemin`` (0 as soon as one live worker cannot reach the store; a dead
worker's last value is dropped by ``mark_process_dead``). ``affinity_pins`` and
``affinity_instances`` describe the shared store and membership, so the answering worker's snapshot
is reported once, never summed. Without the variable everything stays in this process.
Imports nothing of ours but ``routing.model``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from affinity_proxy.routing.model import InstanceState, MembershipView

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("affinity_proxy.metrics")


def multiprocess_dir() -> str | None:
    """The directory this process writes its metric values to, or None in single-process mode.

    Multiprocess mode is on only when prometheus-client was first imported with
    ``PROMETHEUS_MULTIPROC_DIR`` set (it chooses its value class then); a variable set later has no
    effect on the values, so it is ignored here too (with a warning). No I/O.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not getattr(values.ValueClass, "_multiprocess", False):
        if path:
            log.warning("%s is set but prometheus_client was imported before it; metrics cover this process only",
                        MULTIPROC_ENV)
        return None
    return path or None


class _SnapshotCollector(Collector):
    """Reports ``affinity_pins{instance}`` and ``affinity_instances{state}`` from cached snapshots."""

    def __init__(self, view: Callable[[], MembershipView], pins: Callable[[], Mapping[str, int]],
                 sessions: Callable[[], Mapping[str, int]] | None = None) -> None:
        self._view = view
        self._pins = pins
        self._sessions = sessions

    def collect(self) -> Iterable[GaugeMetricFamily]:
        view = self._view()
        states = GaugeMetricFamily("affinity_instances", "Instances per state", labels=["state"])
        counts = {state: 0 for state in InstanceState}
        for inst in view.instances:
            counts[inst.state] += 1
        for state, n in counts.items():
            states.add_metric([state.value], n)
        yield states
        pins = GaugeMetricFamily("affinity_pins", "Stored pins per instance", labels=["instance"])
        pin_counts = dict(self._pins())
        for inst in view.instances:
            pin_counts.setdefault(inst.id, 0)
        for instance, n in sorted(pin_counts.items()):
            pins.add_metric([instance], n)
        yield pins
        if self._sessions is not None:
            sessions = GaugeMetricFamily(
                "affinity_sessions", "Live sessions per instance: stored pins plus anonymous cookie sessions "
                "seen within placement.rebalance.idle_after (estimated on Redis)", labels=["instance"])
            live = dict(self._sessions())
            for inst in view.instances:
                live.setdefault(inst.id, 0)
            for instance, n in sorted(live.items()):
                sessions.add_metric([instance], n)
            yield sessions


class ProxyMetrics:
    """Holds the metric objects; cheap to call from the hot path (label children are cached).

    In multiprocess mode (see the module docstring) ``registry`` still holds the metric objects but
    ``render()`` reports the merged values of every worker; a process should then build one
    ``ProxyMetrics`` only (two would write the same file keys).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir()
        self._exposition = self.registry
        if self.multiprocess_dir is not None:
            self._exposition = CollectorRegistry()
            MultiProcessCollector(self._exposition, path=self.multiprocess_dir)
        r = self.registry
        self.requests = Counter(
            "affinity_requests", "Requests by routing action and reason", ["action", "reason"], registry=r
        )
        self.replays = Counter("affinity_replays", "fly-replay answers sent", ["reason"], registry=r)
        self.responses = Counter("affinity_responses", "Status codes sent to clients", ["code"], registry=r)
        self.replay_loops_prevented = Counter(
            "affinity_replay_loops_prevented", "Replays not sent because the request was already replayed",
            registry=r,
        )
        self.replay_cache_hits = Counter(
            "affinity_replay_cache_hits", "Requests Fly's replay cache sent here (fly-replay-cache-status: hit)",
            registry=r,
        )
        self.replay_cache_invalidations = Counter(
            "affinity_replay_cache_invalidations",
            "Cache hits for users who belong elsewhere, answered with fly-replay-cache: invalidate", registry=r,
        )
        self.repins = Counter("affinity_repins", "Users moved to another instance", ["repin_reason"], registry=r)
        self.orphaned_pins_reaped = Counter(
            "affinity_orphaned_pins_reaped", "Pins deleted because their instance died", registry=r
        )
        self.upstream_duration = Histogram(
            "affinity_upstream_request_duration_seconds", "Time to the upstream's response headers",
            ["instance"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "affinity_upstream_errors", "Failed upstream requests", ["instance", "kind"], registry=r
        )
        self.store_errors = Counter("affinity_store_errors", "Failed pin store operations", ["op"], registry=r)
        self.store_up = Gauge(
            "affinity_store_up", "1 when the pin store answers (every live worker)", registry=r,
            multiprocess_mode="livemin",
        )
        self.websocket_connections = Gauge(
            "affinity_websocket_connections", "Open relayed WebSockets", ["instance"], registry=r,
            multiprocess_mode="livesum",
        )
        self.pin_conflicts = Counter(
            "affinity_pin_conflicts", "Cookie and stored pin disagreed (stored pin won)", registry=r
        )
        self.placements = Counter(
            "affinity_placements", "New sessions placed, by instance and how (ring, overflow, local)",
            ["instance", "how"], registry=r,
        )
        self.store_up.set(1)
        self._response_children: dict[int, Counter] = {}

    def watch_snapshots(
        self, view: Callable[[], MembershipView], pins: Callable[[], Mapping[str, int]],
        sessions: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """Register the gauges computed at scrape time from the current snapshots."""
        collector = _SnapshotCollector(view, pins, sessions)
        self.registry.register(collector)
        if self._exposition is not self.registry:
            self._exposition.register(collector)

    def response(self, code: int) -> None:
        child = self._response_children.get(code)
        if child is None:
            child = self._response_children[code] = self.responses.labels(code=str(code))
        child.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition: this process's registry, or every worker's merged files.

        Multiprocess mode reads one small mmap file per worker and metric type on each call."""
        return generate_latest(self._exposition)
