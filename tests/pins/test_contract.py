"""The PinStore contract, run on every store kind (see tests/pins/conftest.py)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from affinity_proxy.pins.store import PinStore
from affinity_proxy.routing.model import InstanceId
from tests.pins.conftest import DEFAULT_TTL, StoreHarness
from tests.support.waiting import wait_until

A, B, C, D = (InstanceId(x) for x in "abcd")


async def test_kind_and_protocol(store: PinStore, harness: StoreHarness) -> None:
    assert isinstance(store, PinStore)
    assert store.kind == ("memory" if harness.kind == "memory" else "redis")  # cluster, sentinel: Redis


async def test_get_absent(store: PinStore) -> None:
    assert await store.get("nobody") is None


async def test_claim_first_writer_wins(store: PinStore) -> None:
    first = await store.claim("u1", A)
    assert first.won and first.pin.user_key == "u1" and first.pin.instance == A
    assert first.pin.expires_in is not None and 0 < first.pin.expires_in <= DEFAULT_TTL
    second = await store.claim("u1", B)
    assert not second.won and second.pin.instance == A
    pin = await store.get("u1")
    assert pin is not None and pin.instance == A
    assert pin.expires_in is not None and DEFAULT_TTL - 5 < pin.expires_in <= DEFAULT_TTL


async def test_concurrent_claims_have_one_winner(harness: StoreHarness) -> None:
    peers = harness.peers(4)
    instances = [InstanceId(f"i{n}") for n in range(5)]
    results = await asyncio.gather(
        *(peers[n % len(peers)].claim("hot", instances[n % len(instances)]) for n in range(100))
    )
    winners = [r for r in results if r.won]
    assert len(winners) == 1
    assert {r.pin.instance for r in results} == {winners[0].pin.instance}
    pin = await peers[1].get("hot")
    assert pin is not None and pin.instance == winners[0].pin.instance


async def test_repin_compare_and_set(store: PinStore) -> None:
    await store.claim("u", A)
    moved = await store.repin("u", A, B)
    assert moved.won and moved.pin.instance == B
    stale = await store.repin("u", A, C)  # someone else moved it already
    assert not stale.won and stale.pin.instance == B
    assert (await store.get("u")).instance == B  # type: ignore[union-attr]

    present = await store.repin("u", None, C)  # expected "absent" but a pin exists
    assert not present.won and present.pin.instance == B

    fresh = await store.repin("new", None, C)
    assert fresh.won and fresh.pin.instance == C

    # A pin that vanished (expired, dropped, reaped) matches any expected value.
    vanished = await store.repin("gone", A, D)
    assert vanished.won and vanished.pin.instance == D
    assert (await store.get("gone")).instance == D  # type: ignore[union-attr]


async def test_repin_moves_index(store: PinStore) -> None:
    await store.claim("u", A)
    await store.repin("u", A, B)
    assert [p.user_key for p in await store.list(A)] == []
    assert [p.user_key for p in await store.list(B)] == ["u"]
    assert await store.counts() == {B: 1}


async def test_set_is_unconditional(store: PinStore) -> None:
    pin = await store.set("u", A)
    assert pin.instance == A and pin.user_key == "u"
    pin = await store.set("u", B)
    assert pin.instance == B
    assert (await store.get("u")).instance == B  # type: ignore[union-attr]
    assert await store.list(A) == []
    assert await store.counts() == {B: 1}


async def test_drop(store: PinStore) -> None:
    assert await store.drop("none") is False
    await store.claim("u", A)
    assert await store.drop("u") is True
    assert await store.get("u") is None
    assert await store.drop("u") is False

    await store.claim("v", A)
    assert await store.drop("v", expected=B) is False
    assert (await store.get("v")).instance == A  # type: ignore[union-attr]
    assert await store.drop("v", expected=A) is True
    assert await store.get("v") is None
    assert await store.counts() == {}
    assert await store.list() == []


async def test_pins_expire(harness: StoreHarness) -> None:
    store = harness.new(pin_ttl=1.0)
    await store.claim("u", A)
    await store.claim("w", B)  # expires later than u by however long this claim took
    await wait_until(lambda: _absent(store, "u"), timeout=5)
    await wait_until(lambda: _absent(store, "w"), timeout=5)
    assert await store.list() == []
    assert await store.list(A) == []
    assert await store.counts() == {}
    again = await store.claim("u", C)
    assert again.won and again.pin.instance == C


async def test_touch_slides_ttl(harness: StoreHarness) -> None:
    store = harness.new(pin_ttl=1.0)
    await store.claim("u", A)
    await wait_until(lambda: _expires_below(store, "u", 0.6), timeout=5)
    await store.touch("u", A)
    await store.flush()
    pin = await store.get("u")
    assert pin is not None and pin.instance == A
    assert pin.expires_in is not None and pin.expires_in > 0.7
    assert [p.user_key for p in await store.list(A)] == ["u"]


async def test_touch_ignores_other_instance_and_absent_pins(harness: StoreHarness) -> None:
    store = harness.new(pin_ttl=1.0)
    await store.claim("u", A)
    await wait_until(lambda: _expires_below(store, "u", 0.6), timeout=5)
    await store.touch("u", B)  # the pin was re-pinned since this request was routed
    await store.touch("ghost", A)
    await store.flush()
    pin = await store.get("u")
    assert pin is not None and pin.expires_in is not None and pin.expires_in < 0.6
    assert await store.get("ghost") is None


async def test_list_by_instance_and_all(store: PinStore) -> None:
    for n in range(5):
        await store.claim(f"a{n}", A)
    for n in range(3):
        await store.claim(f"b{n}", B)
    assert {p.user_key for p in await store.list(A)} == {f"a{n}" for n in range(5)}
    assert all(p.instance == B for p in await store.list(B))
    everything = await store.list()
    assert {(p.user_key, p.instance) for p in everything} == {(f"a{n}", A) for n in range(5)} | {
        (f"b{n}", B) for n in range(3)
    }
    assert all(p.expires_in is not None and 0 < p.expires_in <= DEFAULT_TTL for p in everything)
    assert len(await store.list(limit=3)) == 3
    assert len(await store.list(A, limit=2)) == 2
    assert await store.list(C) == []
    assert await store.counts() == {A: 5, B: 3}


async def test_counts_consistent_under_concurrent_mixed_operations(harness: StoreHarness) -> None:
    peers = harness.peers(3)
    rng = random.Random(1234)
    keys = [f"user{n}" for n in range(40)]
    instances = [A, B, C, D]

    def op(store: PinStore):  # type: ignore[no-untyped-def]
        key, inst, other = rng.choice(keys), rng.choice(instances), rng.choice(instances)
        kind = rng.choice(["claim", "claim", "repin", "repin_absent", "set", "drop", "drop_expected", "touch"])
        if kind == "claim":
            return store.claim(key, inst)
        if kind == "repin":
            return store.repin(key, other, inst)
        if kind == "repin_absent":
            return store.repin(key, None, inst)
        if kind == "set":
            return store.set(key, inst)
        if kind == "drop":
            return store.drop(key)
        if kind == "drop_expected":
            return store.drop(key, expected=other)
        return store.touch(key, inst)

    for _ in range(4):
        await asyncio.gather(*(op(peers[n % 3]) for n in range(150)))
    for peer in set(peers):
        await peer.flush()

    truth: dict[str, InstanceId] = {}
    for key in keys:
        pin = await peers[0].get(key)
        if pin is not None:
            truth[key] = pin.instance
    expected_counts = dict(Counter(truth.values()))
    assert await peers[1].counts() == expected_counts
    for inst in instances:
        listed = {p.user_key for p in await peers[2].list(inst)}
        assert listed == {k for k, v in truth.items() if v == inst}
    assert {(p.user_key, p.instance) for p in await peers[0].list()} == set(truth.items())


async def test_drop_instance_exactly_once_under_concurrency(harness: StoreHarness) -> None:
    peers = harness.peers(5)
    doomed = {f"d{n}" for n in range(1200)}  # more than one Redis batch
    survivors = {f"s{n}" for n in range(50)}
    for chunk in _chunks(sorted(doomed), 200):
        await asyncio.gather(*(peers[0].claim(k, A) for k in chunk))
    await asyncio.gather(*(peers[0].claim(k, B) for k in survivors))
    await peers[0].claim("moved", A)
    await peers[0].set("moved", B)  # re-pinned: must be left alone

    results = await asyncio.gather(*(p.drop_instance(A) for p in peers))

    flat = [key for result in results for key in result]
    assert len(flat) == len(set(flat)), "a key was reported by two reapers"
    assert set(flat) == doomed
    assert await peers[0].get("d7") is None
    assert (await peers[1].get("moved")).instance == B  # type: ignore[union-attr]
    assert await peers[2].counts() == {B: len(survivors) + 1}
    assert await peers[3].drop_instance(A) == []


async def test_ping_and_close_idempotent(harness: StoreHarness) -> None:
    store = harness.new()
    assert await store.ping() is True
    await store.claim("u", A)
    await store.touch("u", A)
    await store.flush()
    await store.close()
    await store.close()
    assert await store.ping() is False


async def _absent(store: PinStore, key: str) -> bool:
    return await store.get(key) is None


async def _expires_below(store: PinStore, key: str, seconds: float) -> bool:
    pin = await store.get(key)
    assert pin is not None and pin.expires_in is not None
    return pin.expires_in < seconds


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
