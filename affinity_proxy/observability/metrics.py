"""Every Prometheus metric of CONTRACT.md, registered on a registry passed in (never the global one).

Label values come from the routing enums (``DecisionReason``, ``RepinReason``, ``InstanceState``) so a
typo cannot create a new series. Gauges that describe shared state (pins per instance, instances
per state) are refreshed by a collector callback from the latest membership snapshot and pin counts,
so a scrape never does store I/O on the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from affinity_proxy.routing.model import InstanceState, MembershipView

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _SnapshotCollector(Collector):
    """Reports ``affinity_pins{instance}`` and ``affinity_instances{state}`` from cached snapshots."""

    def __init__(self, view: Callable[[], MembershipView], pins: Callable[[], Mapping[str, int]]) -> None:
        self._view = view
        self._pins = pins

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


class ProxyMetrics:
    """Holds the metric objects; cheap to call from the hot path (label children are cached)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
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
        self.store_up = Gauge("affinity_store_up", "1 when the pin store answers", registry=r)
        self.websocket_connections = Gauge(
            "affinity_websocket_connections", "Open relayed WebSockets", ["instance"], registry=r
        )
        self.pin_conflicts = Counter(
            "affinity_pin_conflicts", "Cookie and stored pin disagreed (stored pin won)", registry=r
        )
        self.store_up.set(1)
        self._response_children: dict[int, Counter] = {}

    def watch_snapshots(
        self, view: Callable[[], MembershipView], pins: Callable[[], Mapping[str, int]]
    ) -> None:
        """Register the gauges computed at scrape time from the current snapshots."""
        self.registry.register(_SnapshotCollector(view, pins))

    def response(self, code: int) -> None:
        child = self._response_children.get(code)
        if child is None:
            child = self._response_children[code] = self.responses.labels(code=str(code))
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
