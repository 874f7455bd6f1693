"""The hot path: a fresh, valid cookie is served with no pin-store round trip."""

from __future__ import annotations

from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.pins.store import ClaimResult, Pin
from affinity_proxy.routing.model import InstanceId
from tests.functional.helpers import COOKIE, affinity_cookie, base
from tests.support.backends import make_config


class CountingStore(MemoryPinStore):
    """The real memory store, counting the calls the request path makes."""

    def __init__(self) -> None:
        super().__init__(pin_ttl=3600)
        self.calls: dict[str, int] = {}

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    async def get(self, user_key: str) -> Pin | None:
        self._count("get")
        return await super().get(user_key)

    async def claim(self, user_key: str, instance: InstanceId) -> ClaimResult:
        self._count("claim")
        return await super().claim(user_key, instance)

    async def touch(self, user_key: str, instance: InstanceId) -> None:
        self._count("touch")
        await super().touch(user_key, instance)


async def test_valid_cookie_costs_no_store_call(engine: str, backends, start_proxy, http) -> None:
    store = CountingStore()
    server = await start_proxy(make_config(backends, engine=engine), store=store)
    async with http.get(base(server) + "/", headers={"X-User-Id": "hot"}) as resp:
        cookie = affinity_cookie(resp)
    assert store.calls == {"claim": 1}  # a new user costs one round trip: claim-or-get
    view_before = server.ctx.membership.current()
    for _ in range(200):
        headers = {"X-User-Id": "hot", "Cookie": f"{COOKIE}={cookie}"}
        async with http.get(base(server) + "/", headers=headers) as resp:
            assert resp.status == 200
    assert store.calls == {"claim": 1}, "cookie requests must not touch the store"
    assert server.ctx.membership.current() is view_before, "no membership/ring rebuild per request"
