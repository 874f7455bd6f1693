"""EdgeRouter without sockets: round robin, stopped machines, retries, timeouts and fallbacks."""

from __future__ import annotations

import re

from affinity_proxy.devtools.fly.edge_route import (
    PA03,
    PA04,
    PR02,
    PR02_FORCED,
    PR03,
    PR04,
    EdgeRouter,
    Hop,
    new_request_id,
)
from affinity_proxy.routing.replay import parse_replay_failed, parse_replay_src


def _router(*ids: str) -> EdgeRouter:
    return EdgeRouter({i: f"http://{i}" for i in ids}, app="demo", region="lcl", now_us=lambda: 42)


def test_round_robin_prefers_started_machines() -> None:
    router = _router("a", "b", "c")
    assert [router.pick().id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]  # type: ignore[union-attr]
    router.machines["b"].state = "stopped"
    router.machines["c"].state = "destroyed"
    assert {router.pick().id for _ in range(4)} == {"a"}  # type: ignore[union-attr]
    router.machines["a"].state = "stopped"
    assert router.pick().id in {"a", "b"}  # type: ignore[union-attr]  # autostart when nothing runs
    assert router.pick(exclude={"a", "b"}) is None


def test_initial_hops() -> None:
    router = _router("a", "b")
    assert router.initial({"fly-force-instance-id": " b "}) == Hop(router.machines["b"])
    assert router.initial({"fly-force-instance-id": "zz"}) == PR02_FORCED
    hop = router.initial({"fly-prefer-instance-id": "zz"})
    assert isinstance(hop, Hop) and hop.headers == {"fly-preferred-instance-unavailable": "zz"} and hop.balanced
    hop = router.initial({"fly-prefer-instance-id": "bad id\\"})
    assert isinstance(hop, Hop) and hop.headers == {}
    router.machines["a"].state = router.machines["b"].state = "destroyed"
    assert router.initial({}) == PR04


def test_replay_hops_and_errors() -> None:
    router = _router("a", "b")
    a = router.machines["a"]
    hop = router.replay(a, "instance=b;state=s1", 1.0)
    assert isinstance(hop, Hop) and hop.machine.id == "b" and not hop.balanced
    assert hop.headers == {"fly-replay-src": "instance=a;region=lcl;t=42;state=s1"}
    assert parse_replay_src(hop.headers["fly-replay-src"]).instance == "a"  # type: ignore[union-attr]
    assert router.replay(a, "instance=zz", 1.0) == PR02
    assert router.replay(a, "garbage", 1.0) == PA03
    assert router.replay(a, "app=other", 1.0) == PA04
    assert router.replay(a, "region=ams", 1.0) == PR04
    hop = router.replay(a, "elsewhere=true", 1.0)
    assert isinstance(hop, Hop) and hop.machine.id == "b" and hop.balanced


def test_retry_timeout_and_fallbacks() -> None:
    router = _router("a", "b", "c")
    a = router.machines["a"]
    first = router.initial({})
    assert isinstance(first, Hop)
    again = router.retry_elsewhere(first, {first.machine.id})
    assert isinstance(again, Hop) and again.machine.id != first.machine.id
    forced = router.initial({"fly-force-instance-id": "b"})
    assert isinstance(forced, Hop) and router.retry_elsewhere(forced, {"b"}) == PR03
    plain = router.replay(a, "instance=b", 1.0)
    assert isinstance(plain, Hop) and router.timed_out(plain) == PR03 and router.retry_elsewhere(plain, {"b"}) == PR03
    with_fallback = router.replay(a, "instance=b;timeout=1s;fallback=force_self", 1.0)
    assert isinstance(with_fallback, Hop) and with_fallback.timeout == 1.0
    back = router.timed_out(with_fallback)
    assert isinstance(back, Hop) and back.machine.id == "a" and back.is_fallback and back.timeout is None
    failed = parse_replay_failed(back.headers["fly-replay-failed"])
    assert failed is not None and (failed.instance, failed.reason, failed.replay_source) == ("b", "timeout", "a")
    assert router.retry_elsewhere(back, {"a"}) == PR03  # a fallback never falls back again
    # the replayer itself is gone: force_self fails, prefer_self picks any machine
    a.state = "destroyed"
    assert router.replay(a, "instance=zz;fallback=force_self", 1.0) == PR02
    other = router.replay(a, "instance=zz;fallback=prefer_self", 1.0)
    assert isinstance(other, Hop) and other.machine.id in {"b", "c"} and other.is_fallback


def test_request_id_shape() -> None:
    ids = {new_request_id("lcl") for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}-lcl", i) for i in ids)
