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


class Tally:
    """A lane's requests of one kind since the last flush: ``inc_all(counters)``,
    ``count_response(status)``, ``observe_duration(instance, seconds)`` and the recent events'
    ``response`` per ``add``, in a few attribute updates (``forward_lane.LaneExchange``);
    ``Counts.flush`` drains it with the rest."""

    __slots__ = ("counters", "counts", "dirty", "duration", "n", "response", "seconds", "status")

    def __init__(self, counts: Counts, counters: tuple[Any, ...], response: Any, duration: Any, status: int) -> None:
        self.counts = counts
        self.counters = counters
        self.response = response
        self.duration = duration
        self.status = status
        self.n = 0
        self.seconds: list[float] = []
        self.dirty = False

    def add(self, seconds: float) -> None:
        """One request counted with its response, which took ``seconds`` at the instance."""
        self.n += 1
        self.seconds.append(seconds)
        if not self.dirty:
            self.dirty = True
            self.counts._dirty(self)

    def drain(self, pending_all: dict[tuple[Any, ...], int], pending: dict[Any, int],
              observed: dict[Any, list[float]]) -> None:
        n, self.n = self.n, 0
        seconds, self.seconds = self.seconds, []
        self.dirty = False
        if n:
            pending_all[self.counters] = pending_all.get(self.counters, 0) + n
            pending[self.response] = pending.get(self.response, 0) + n
            values = observed.get(self.duration)
            if values is None:
                observed[self.duration] = seconds
            else:
                values += seconds
            ctx = self.counts.ctx
            ctx.events.responses(n, self.status == ctx.config.fly.replay_status)


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
        self._tallies: dict[tuple[Any, ...], Tally] = {}
        self._dirty_tallies: list[Tally] = []
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
        if self._dirty_tallies:
            tallies, self._dirty_tallies = self._dirty_tallies, []
            for tally in tallies:
                tally.drain(self._pending_all, pending, self._observed)
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

    def tally_of(self, counters: tuple[Any, ...], instance: str, status: int) -> Tally:
        """The ``Tally`` of a lane's requests routed with ``counters`` to ``instance`` and answered
        ``status`` (one per such triple, kept; a forward lane also keeps its own)."""
        key = (counters, instance, status)
        found = self._tallies.get(key)
        if found is None:
            if len(self._tallies) >= 4096:
                self._tallies.clear()
            found = self._tallies[key] = Tally(self, counters, self.response_child(status),
                                               self.child(self.ctx.metrics.upstream_duration, instance), status)
        return found

    def _dirty(self, tally: Tally) -> None:
        self._dirty_tallies.append(tally)
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
