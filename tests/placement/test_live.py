"""The run-time half of placement (issue #14): the live-session snapshot, its sketches (exact sets in
memory, HyperLogLogs on a real Redis), the move budget, and the decision rule for idle anonymous
sessions."""

from __future__ import annotations

import pytest

from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.placement.budget import MoveBudget
from affinity_proxy.placement.live import LiveSessions, MemorySketch, RedisSketch, bucket_width, window_buckets
from affinity_proxy.placement.rebalancer import RebalanceOutcome, Rebalancer
from affinity_proxy.routing.cookie import AffinityCookie
from affinity_proxy.routing.decide import DecidePolicy, DecisionReason, RepinReason, Route, RouteInput, decide
from affinity_proxy.routing.model import Instance, InstanceId, MembershipView


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_buckets_cover_the_window() -> None:
    assert bucket_width(600) == 60 and bucket_width(5) == 1
    buckets = window_buckets(1000.5, 10)
    assert buckets.start <= 990 and buckets.stop - 1 == 1000


async def test_memory_sketch_counts_distinct_sessions_within_the_window() -> None:
    sketch = MemorySketch(window=10)
    for token in ("x", "y", "x"):
        sketch.add("a", token, 100.0)
    sketch.add("b", "z", 105.0)
    assert await sketch.counts(["a", "b"], 106.0) == {"a": 2, "b": 1}
    assert await sketch.counts(["a", "b"], 112.0) == {"b": 1}  # a's bucket left the window


async def test_redis_sketch_merges_every_process(redis_url: str) -> None:
    stores = [RedisPinStore(redis_url, pin_ttl=60) for _ in range(2)]
    try:
        one, two = (RedisSketch(s, window=30) for s in stores)
        for i in range(100):
            one.add("a", f"s{i}", 1000.0)
        for i in range(50, 150):  # half of them seen by the other process too
            two.add("a", f"s{i}", 1001.0)
        two.add("b", "t", 1001.0)
        await one.counts(["a", "b"], 1002.0)
        counted = await two.counts(["a", "b"], 1002.0)
        assert counted["b"] == 1 and abs(counted["a"] - 150) <= 3  # HyperLogLog: 0.81 % standard error
        assert await one.counts(["a", "b"], 1002.0) == counted  # nothing pending: the same merged view
    finally:
        for store in stores:
            await store.close()


async def test_live_sessions_add_own_placements_until_the_store_shows_them() -> None:
    clock = Clock()
    store = MemoryPinStore(pin_ttl=600)
    live = LiveSessions(store, window=10, instances=lambda: ["a", "b"], clock=clock)
    await store.claim("u1", InstanceId("a"))
    live.placed("a")
    assert live.loads == {"a": 1}
    await live.refresh()
    assert live.loads == {"a": 1} and live.pins == {"a": 1}  # counted once: the refresh read it
    live.seen("b", "cookie-1")
    live.seen("b", "cookie-1")
    await live.refresh()
    assert live.anonymous == {"b": 1} and live.loads == {"a": 1, "b": 1}
    live.moved("b", "a")
    assert live.loads == {"a": 2, "b": 0}
    clock.now += 5
    await live.refresh()  # the old cookie is still in b's sketch: still taken off
    assert live.loads == {"a": 1, "b": 0}
    clock.now += 20
    await live.refresh()
    assert live.loads == {"a": 1}


def test_move_budget_refills_at_the_rate() -> None:
    clock = Clock(0.0)
    budget = MoveBudget(60, clock=clock)  # one a second, five at most
    assert [budget.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 2.0
    assert [budget.take() for _ in range(3)] == [True, True, False]
    with pytest.raises(ValueError):
        MoveBudget(0)


VIEW = MembershipView.build([Instance(InstanceId(i)) for i in "abc"])
POLICY = DecidePolicy(revalidate_after=1.0, rebalance_idle=6.0)


def anonymous_on_a(age: float, loads: dict[str, int], may: bool = True) -> RouteInput:
    return RouteInput(cookie=AffinityCookie(InstanceId("a"), 1000, ""), now=1000 + age, loads=loads,
                      may_rebalance=may, anonymous_key="k")


def test_an_idle_anonymous_session_over_its_share_moves() -> None:
    route = decide(anonymous_on_a(10, {"a": 30, "b": 0, "c": 0}), VIEW, POLICY)
    assert isinstance(route, Route) and route.instance in ("b", "c") and route.set_cookie
    assert route.reason is DecisionReason.REPIN and route.repin_reason is RepinReason.REBALANCE


@pytest.mark.parametrize(("age", "loads", "may", "policy"), [
    (5, {"a": 30}, True, POLICY),  # active: the cookie is younger than idle_after + revalidate_after
    (10, {"a": 10, "b": 10, "c": 10}, True, POLICY),  # a holds its share
    (10, {"a": 30}, False, POLICY),  # no move left in the budget
    (10, {"a": 30}, True, DecidePolicy(revalidate_after=1.0)),  # rebalance off
])
def test_anonymous_sessions_that_stay(age: float, loads: dict[str, int], may: bool, policy: DecidePolicy) -> None:
    route = decide(anonymous_on_a(age, loads, may), VIEW, policy)
    assert isinstance(route, Route) and route.instance == "a" and route.reason is DecisionReason.COOKIE


async def test_rebalancer_holds_back_after_a_store_error() -> None:
    """Touches that failed are written later: until one idle threshold has passed, a pin's last use
    may look older than it is, so no pin moves."""
    clock = Clock()
    store = RedisPinStore("redis://127.0.0.1:1", pin_ttl=60, timeout=0.1)  # nothing listens there
    try:
        rebalancer = Rebalancer(store, lambda: VIEW, idle_after=10, max_moves_per_minute=60, pin_ttl=60, slack=5,
                                clock=clock)
        with pytest.raises(PinStoreUnavailable):
            await rebalancer.run_once()
        assert store.errors >= 1
        assert await rebalancer.run_once() == RebalanceOutcome() and rebalancer.held_back == 1
        clock.now += 16  # past idle_after + slack: it tries the store again
        with pytest.raises(PinStoreUnavailable):
            await rebalancer.run_once()
    finally:
        await store.close()
