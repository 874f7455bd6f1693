"""Metrics of the fast engine: the counters ``proxy.act`` names, updated in batches.

Which counters a request adds to is ``proxy.act``'s to say (``act.counts``, ``act.refuse_counts``,
``act.failure_counts``). ``Counts`` collects the increments (and upstream-duration observations)
of the current event-loop burst in a dict and applies them right after the callbacks that produced
them (``loop.call_soon``), so a burst takes each counter's lock once and a /metrics scrape, which
always runs in a later callback, sees every one. Label children are looked up once. No I/O.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Any

from affinity_proxy.proxy import act
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.routing.decide import Route


def _observe_all(histogram: Any, values: list[float]) -> None:
    """What ``Histogram.observe`` does per value, with one increment per bucket and one of the sum.
    Falls back to ``observe`` when prometheus-client's histogram does not look as expected."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    for value in values:
        i = bisect_left(bounds, value)  # the first bound with value <= bound, as observe() picks
        if i < len(bounds):
            counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, n in counts.items():
        buckets[i].inc(n)


class Counts:
    """One per process (event loop)."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._children: dict[tuple[Any, ...], Any] = {}
        self._pending: dict[Any, int] = {}
        self._pending_all: dict[tuple[Any, ...], int] = {}
        self._observed: dict[Any, list[float]] = {}
        self._responses: dict[int, Any] = {}
        self._durations: dict[str, Any] = {}
        self._lane_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._flush_scheduled = False
        self.loop = asyncio.get_running_loop()

    def child(self, metric: Any, *labels: str) -> Any:
        """The labelled child of ``metric`` (looked up once; labels may be the routing StrEnums)."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def inc(self, counter: Any) -> None:
        """Count one on ``counter`` (a counter or a labelled child). Counts are added to the
        counters in one go right after the current event-loop callbacks, so a burst of requests
        takes each counter's lock once; anything that awaits (a /metrics scrape) sees them."""
        pending = self._pending
        pending[counter] = pending.get(counter, 0) + 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def inc_all(self, counters: tuple[Any, ...]) -> None:
        """``inc`` on each of ``counters`` (a tuple kept by the caller: one dict update per call)."""
        pending = self._pending_all
        pending[counters] = pending.get(counters, 0) + 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def observe(self, histogram: Any, value: float) -> None:
        """``histogram.observe(value)``, applied with the counters (one lock per bucket per burst)."""
        values = self._observed.get(histogram)
        if values is None:
            values = self._observed[histogram] = []
        values.append(value)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        if self._pending_all:
            pending_all, self._pending_all = self._pending_all, {}
            for counters, n in pending_all.items():
                for counter in counters:
                    pending[counter] = pending.get(counter, 0) + n
        for counter, n in pending.items():
            counter.inc(n)
        observed, self._observed = self._observed, {}
        for histogram, values in observed.items():
            _observe_all(histogram, values)

    def children(self, counts: tuple[act.Count, ...]) -> tuple[Any, ...]:
        """The counters (labelled children) named by ``act.counts`` and its siblings."""
        m = self.ctx.metrics
        return tuple(self.child(getattr(m, name), *labels) if labels else getattr(m, name) for name, labels in counts)

    def tally(self, counts: tuple[act.Count, ...]) -> None:
        """Count one on each counter ``counts`` names."""
        self.inc_all(self.children(counts))

    def count(self, route: Route, action: str) -> None:
        """One routed request: the counters of ``act.counts`` and the recent events."""
        self.tally(act.counts(action, route))
        self.ctx.events.route(action, route)

    def observe_duration(self, instance: str, seconds: float) -> None:
        """``affinity_upstream_request_duration_seconds{instance}``."""
        child = self._durations.get(instance)
        if child is None:
            child = self._durations[instance] = self.child(self.ctx.metrics.upstream_duration, instance)
        self.observe(child, seconds)

    def lane_response(self, counters: tuple[Any, ...] | None, instance: str, status: int, seconds: float) -> None:
        """``inc_all(counters)`` (unless None), ``observe_duration(instance, seconds)`` and
        ``count_response(status)`` in one call, the children looked up once per (instance, status):
        a lane's request and its whole response (``forward_lane``)."""
        children = self._lane_children.get((instance, status))
        if children is None:
            if len(self._lane_children) >= 4096:
                self._lane_children.clear()
            children = self._lane_children[(instance, status)] = (
                self.response_child(status), self.child(self.ctx.metrics.upstream_duration, instance))
        response, duration = children
        if counters is not None:
            pending_all = self._pending_all
            pending_all[counters] = pending_all.get(counters, 0) + 1
        pending = self._pending
        pending[response] = pending.get(response, 0) + 1
        values = self._observed.get(duration)
        if values is None:
            values = self._observed[duration] = []
        values.append(seconds)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def response_child(self, status: int) -> Any:
        """``responses.labels(code=str(status))``, looked up once."""
        child = self._responses.get(status)
        if child is None:
            child = self._responses[status] = self.child(self.ctx.metrics.responses, str(status))
        return child

    def count_response(self, status: int) -> None:
        """``ProxyMetrics.response`` (same child as ``responses.labels(code=str(status))``)."""
        child = self._responses.get(status)
        if child is None:
            child = self._responses[status] = self.child(self.ctx.metrics.responses, str(status))
        self.inc(child)
