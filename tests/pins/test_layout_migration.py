"""Rolling deploy across the pin-layout change: old nodes (the sorted-set index layout, played here by
its verbatim scripts in ``pins.redis_legacy``) and new nodes (``RedisPinStore``) on one Redis or one
cluster. Both layouts share the pin keys, so each reads the other's pins and a user never gets two
pins; the new store counts legacy pins from their index, moves them to its counters when it next
writes, touches or drops them, and its reaper deletes pins of both layouts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from affinity_proxy.pins import redis_legacy as legacy
from affinity_proxy.pins.redis import RedisPinStore, bucket_of, open_client, pin_key
from affinity_proxy.routing.model import InstanceId

A, B = InstanceId("a"), InstanceId("b")
P = "affinity:"
TTL_MS = 60_000


class OldNode:
    """A node still running the previous layout: its scripts, called with its keys and arguments."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.scripts = {name: client.register_script(src) for name, src in legacy.SCRIPTS.items()}

    @staticmethod
    def _bucket(user: str) -> tuple[str, str, str]:
        tag = f"{{p{bucket_of(user)}}}"
        return f"{P}instances{tag}", f"{P}idx:{tag}", f"{P}pin:{tag}"

    async def claim(self, user: str, instance: str) -> tuple[bool, str]:
        instances, idx, _ = self._bucket(user)
        keys, args = [pin_key(P, user), instances], [idx, user, instance, TTL_MS]
        won, current, _ = await self.scripts["CLAIM"](keys=keys, args=args)
        return bool(won), current

    async def get(self, user: str) -> str | None:
        current, _ = await self.scripts["GET"](keys=[pin_key(P, user)], args=[])
        return current  # type: ignore[no-any-return]

    async def touch(self, user: str, instance: str) -> None:
        instances, idx, pins = self._bucket(user)
        await self.scripts["TOUCH"](keys=[instances], args=[idx, pins, TTL_MS, user, instance])

    async def indexed(self, user: str, instance: str) -> bool:
        _, idx, _ = self._bucket(user)
        return await self.client.zscore(idx + instance, user) is not None


@pytest.fixture(params=["redis", "cluster"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[OldNode, RedisPinStore]]:
    url = str(request.getfixturevalue(f"{request.param}_url"))
    client, _ = open_client(url, timeout=2.0, max_connections=4)
    store = RedisPinStore(url, pin_ttl=TTL_MS / 1000, timeout=2.0)
    try:
        yield OldNode(client), store
    finally:
        await store.close()
        await client.aclose()


async def test_new_store_reads_counts_and_lists_old_pins(nodes: tuple[OldNode, RedisPinStore]) -> None:
    old, store = nodes
    users = [f"old{n}" for n in range(40)]
    for n, user in enumerate(users):
        assert (await old.claim(user, A if n % 4 else B))[0]
    assert await store.counts() == {A: 30, B: 10}
    pin = await store.get("old1")
    assert pin is not None and pin.instance == A and pin.expires_in is not None and pin.expires_in > 50
    lost = await store.claim("old0", A)  # claim-or-get: the old pin wins
    assert not lost.won and lost.pin.instance == B
    assert {p.user_key for p in await store.list(B)} == {u for n, u in enumerate(users) if n % 4 == 0}
    assert len(await store.list(limit=1000)) == 40


async def test_old_nodes_read_new_pins_so_no_user_gets_two(nodes: tuple[OldNode, RedisPinStore]) -> None:
    old, store = nodes
    assert (await store.claim("new1", A)).won
    assert await old.get("new1") == A
    assert await old.claim("new1", B) == (False, A)


async def test_writes_touches_and_drops_move_old_pins_to_the_counters(nodes: tuple[OldNode, RedisPinStore]) -> None:
    old, store = nodes
    for user in ("t", "r", "d", "keep"):
        await old.claim(user, A)
    await store.touch("t", A)
    await store.flush()
    moved = await store.repin("r", A, B)
    assert moved.won
    assert await store.drop("d")
    assert not await old.indexed("t", A) and not await old.indexed("r", A) and not await old.indexed("d", A)
    assert await old.indexed("keep", A)  # untouched: still counted from the old index
    assert await store.counts() == {A: 2, B: 1}
    pin = await store.get("t")
    assert pin is not None and pin.instance == A and pin.expires_in is not None and pin.expires_in > 50


async def test_reaper_drops_pins_of_both_layouts(nodes: tuple[OldNode, RedisPinStore]) -> None:
    old, store = nodes
    for n in range(60):
        await old.claim(f"o{n}", A if n % 3 else B)
        await store.claim(f"n{n}", A if n % 3 else B)
    await old.touch("n1", A)  # an old node slides a new pin: now in the old index too
    dropped = await store.drop_instance(A)
    assert sorted(dropped) == sorted(f"{kind}{n}" for kind in "on" for n in range(60) if n % 3)
    counts = await store.counts()
    # n1 was counted twice (its counter field and the old index) once the old node slid it: that
    # field stays until n1's earlier expiry passes. The only over-count a mixed deploy leaves.
    assert counts[B] == 40 and counts.get(A, 0) <= 1
    assert await store.get("o1") is None and await store.get("n1") is None
    assert await store.drop_instance(A) == []
