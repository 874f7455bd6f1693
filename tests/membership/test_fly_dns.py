"""FlyDnsSource against a real DNS server on loopback serving the vms TXT records as Fly's does."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import pytest

from affinity_proxy.membership.fly_dns import FlyDnsSource, parse_vms_txt, split_server
from affinity_proxy.membership.sources import DiscoveryError, MembershipSource, StaticSource
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState
from tests.support.dns_server import DnsServer

APP = "shop"
VMS = f"vms.{APP}.internal"
ALL = f"all.vms.{APP}.internal"
LOCAL = "148e21ea7a4de8"
UPSTREAM = "http://127.0.0.1:3000/"


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        yield server


def source(server: DnsServer, **kw: object) -> FlyDnsSource:
    args: dict = dict(
        local_machine_id=LOCAL, dns_server=server.host, port=server.port, timeout=1.0,
        private_url="http://{id}.vm.{app}.internal:{port}", private_port=8080, local_upstream=UPSTREAM,
    )
    args.update(kw)
    return FlyDnsSource(APP, **args)


def states(instances: list[Instance]) -> dict[str, InstanceState]:
    return {i.id: i.state for i in instances}


async def test_started_and_stopped_machines(dns_server: DnsServer) -> None:
    dns_server.set_txt(VMS, f"{LOCAL} ams,2871e9dae67d58 yul")
    dns_server.set_txt(ALL, f"{LOCAL} ams,2871e9dae67d58 yul,6830d10c463198 ewr")
    found = await source(dns_server).fetch()
    assert [(i.id, i.state, i.region, i.local) for i in found] == [
        (LOCAL, InstanceState.UP, "ams", True),
        ("2871e9dae67d58", InstanceState.UP, "yul", False),
        ("6830d10c463198", InstanceState.STOPPED, "ewr", False),
    ]
    by_id = {i.id: i for i in found}
    assert by_id[InstanceId(LOCAL)].url == "http://127.0.0.1:3000"
    assert by_id[InstanceId("2871e9dae67d58")].url == "http://2871e9dae67d58.vm.shop.internal:8080"
    assert by_id[InstanceId("6830d10c463198")].url == "http://6830d10c463198.vm.shop.internal:8080"
    assert all(i.weight == 1 for i in found)
    assert dns_server.query_count(VMS) == 1 and dns_server.query_count(ALL) == 1


async def test_is_a_membership_source(dns_server: DnsServer) -> None:
    assert isinstance(source(dns_server), MembershipSource)
    assert isinstance(StaticSource([]), MembershipSource)
    static = StaticSource([Instance(InstanceId("a"), "http://a")])
    assert await static.fetch() == [Instance(InstanceId("a"), "http://a")]


async def test_private_url_placeholders(dns_server: DnsServer) -> None:
    dns_server.set_txt(VMS, "aa1 fra")
    dns_server.set_txt(ALL, "aa1 fra")
    src = source(dns_server, private_url="https://{region}.{app}.example:{port}/{id}/", private_port=9000)
    assert [i.url for i in await src.fetch()] == ["https://fra.shop.example:9000/aa1"]
    with pytest.raises(ValueError, match="private_url"):
        source(dns_server, private_url="http://{host}:1")


async def test_multi_string_txt_is_joined_before_splitting(dns_server: DnsServer) -> None:
    ids = [f"{n:014x}" for n in range(0x1857961b2d7300, 0x1857961b2d7300 + 40)]
    data = ",".join(f"{mid} {'yul' if n % 2 else 'syd'}" for n, mid in enumerate(ids))
    # cut into 255-byte character-strings, as DNS does: the cuts fall inside ids and regions
    chunks = tuple(data[i:i + 255] for i in range(0, len(data), 255))
    assert len(chunks) == 3 and not all(c.endswith(",") for c in chunks[:-1])
    dns_server.set_txt(VMS, chunks)
    dns_server.set_txt(ALL, chunks)
    found = await source(dns_server).fetch()
    assert [i.id for i in found] == ids
    assert {i.region for i in found} == {"yul", "syd"}
    assert set(states(found).values()) == {InstanceState.UP}


async def test_answer_too_big_for_udp_comes_over_tcp(dns_server: DnsServer) -> None:
    ids = [f"{n:014x}" for n in range(0x2000000000000, 0x2000000000000 + 150)]
    data = ",".join(f"{mid} iad" for mid in ids)
    dns_server.set_txt(VMS, tuple(data[i:i + 255] for i in range(0, len(data), 255)))
    dns_server.set_txt(ALL, tuple(data[i:i + 255] for i in range(0, len(data), 255)))
    found = await source(dns_server).fetch()
    assert [i.id for i in found] == ids
    assert any(q[2] == "tcp" for q in dns_server.queries)


async def test_several_txt_records_are_all_read(dns_server: DnsServer) -> None:
    dns_server.set_txt(VMS, "aa1 ams", "bb2 fra")
    dns_server.set_txt(ALL, "aa1 ams", "bb2 fra", "cc3 lhr")
    assert states(await source(dns_server).fetch()) == {
        "aa1": InstanceState.UP, "bb2": InstanceState.UP, "cc3": InstanceState.STOPPED,
    }


async def test_malformed_entries_are_skipped(dns_server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    dns_server.set_txt(VMS, "  aa1   ams ,,, ,bad/id fra,  bb2\tfra  ,")
    dns_server.set_txt(ALL, ",aa1 ams,-nope lhr,bb2 fra,cc3,dd4 ewr extra words,ee5 b@d")
    with caplog.at_level(logging.DEBUG, logger="affinity_proxy.discovery.dns"):
        found = await source(dns_server).fetch()
    assert [(i.id, i.state, i.region) for i in found] == [
        ("aa1", InstanceState.UP, "ams"),
        ("bb2", InstanceState.UP, "fra"),
        ("cc3", InstanceState.STOPPED, ""),
        ("dd4", InstanceState.STOPPED, "ewr"),
        ("ee5", InstanceState.STOPPED, ""),
    ]
    skipped = [r.getMessage() for r in caplog.records if "invalid machine id" in r.getMessage()]
    assert any("bad/id" in m for m in skipped) and any("-nope" in m for m in skipped)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], {}),
        ([""], {}),
        (["a1 ams"], {"a1": "ams"}),
        (["a1 ams,a1 fra"], {"a1": "ams"}),  # first wins
        (["a1"], {"a1": ""}),
        (["a1 am$"], {"a1": ""}),
        (["\u00e9t\u00e9 ams,b2 ams"], {"b2": "ams"}),
        (["a1 ams", "b2 fra"], {"a1": "ams", "b2": "fra"}),
        ([" , a1  ams\n,\tb2 fra x "], {"a1": "ams", "b2": "fra"}),
        (["x" * 65 + " ams"], {}),
    ],
)
def test_parse_vms_txt_table(records: list[str], expected: dict[str, str]) -> None:
    assert parse_vms_txt(records) == expected


async def test_nxdomain_for_vms_means_nothing_started(dns_server: DnsServer) -> None:
    dns_server.set_nxdomain(VMS)
    dns_server.set_txt(ALL, f"{LOCAL} ams,bb2 fra")
    assert states(await source(dns_server).fetch()) == {LOCAL: InstanceState.STOPPED, "bb2": InstanceState.STOPPED}
    dns_server.set_empty(VMS)  # NOERROR without data: the same
    assert states(await source(dns_server).fetch()) == {LOCAL: InstanceState.STOPPED, "bb2": InstanceState.STOPPED}


@pytest.mark.parametrize("how", ["nxdomain", "empty", "garbage"])
async def test_all_vms_naming_no_machine_is_an_error(dns_server: DnsServer, how: str) -> None:
    dns_server.set_txt(VMS, "aa1 ams")
    if how == "nxdomain":
        dns_server.set_nxdomain(ALL)
    elif how == "empty":
        dns_server.set_empty(ALL)
    else:
        dns_server.set_txt(ALL, ", ,/x y")
    with pytest.raises(DiscoveryError, match=r"all\.vms\.shop\.internal\. .*is fly\.app 'shop' right"):
        await source(dns_server).fetch()


async def test_servfail_is_an_error(dns_server: DnsServer) -> None:
    dns_server.set_txt(ALL, "aa1 ams")
    dns_server.set_servfail(VMS)
    with pytest.raises(DiscoveryError, match=r"vms\.shop\.internal\. at 127\.0\.0\.1:\d+ failed: SERVFAIL"):
        await source(dns_server).fetch()
    dns_server.set_txt(VMS, "aa1 ams")
    dns_server.set_servfail(ALL)
    with pytest.raises(DiscoveryError, match="SERVFAIL"):
        await source(dns_server).fetch()


async def test_silent_server_times_out(dns_server: DnsServer) -> None:
    dns_server.set_txt(VMS, "aa1 ams")
    dns_server.set_txt(ALL, "aa1 ams")
    dns_server.silent = True
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"no answer within 0\.3s"):
        await source(dns_server, timeout=0.3).fetch()
    assert time.monotonic() - started < 2.0
    assert dns_server.query_count(VMS) >= 2  # re-sent once halfway
    dns_server.silent = False
    assert states(await source(dns_server, timeout=0.3).fetch()) == {"aa1": InstanceState.UP}


async def test_a_lost_udp_packet_is_resent(dns_server: DnsServer) -> None:
    dns_server.set_txt(VMS, "aa1 ams")
    dns_server.set_txt(ALL, "aa1 ams,bb2 fra")
    dns_server.drop = 1
    found = await source(dns_server, timeout=1.0).fetch()
    assert states(found) == {"aa1": InstanceState.UP, "bb2": InstanceState.STOPPED}
    assert len(dns_server.queries) == 3


async def test_server_down_is_an_error() -> None:
    server = DnsServer()
    await server.start()
    await server.stop()
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"127\.0\.0\.1:\d+"):
        await source(server, timeout=0.3).fetch()
    assert time.monotonic() - started < 2.0


async def test_records_change_between_fetches(dns_server: DnsServer) -> None:
    src = source(dns_server)
    dns_server.set_txt(VMS, f"{LOCAL} ams,bb2 fra,cc3 lhr")
    dns_server.set_txt(ALL, f"{LOCAL} ams,bb2 fra,cc3 lhr")
    assert set(states(await src.fetch())) == {LOCAL, "bb2", "cc3"}
    # bb2 autostops; cc3 is destroyed (gone from all.vms too); dd4 is deployed and started
    dns_server.set_txt(VMS, f"{LOCAL} ams,dd4 fra")
    dns_server.set_txt(ALL, f"{LOCAL} ams,bb2 fra,dd4 fra")
    assert states(await src.fetch()) == {
        LOCAL: InstanceState.UP, "dd4": InstanceState.UP, "bb2": InstanceState.STOPPED,
    }
    # a bluegreen deploy: every old Machine destroyed, new ones started
    dns_server.set_txt(VMS, "ee5 ams,ff6 fra")
    dns_server.set_txt(ALL, "ee5 ams,ff6 fra")
    assert states(await src.fetch()) == {"ee5": InstanceState.UP, "ff6": InstanceState.UP}


async def test_dns_server_with_port_and_hostname(dns_server: DnsServer) -> None:
    dns_server.set_txt(VMS, "aa1 ams")
    dns_server.set_txt(ALL, "aa1 ams")
    for server in (dns_server.address, f"localhost:{dns_server.port}"):
        src = source(dns_server, dns_server=server, port=1)
        assert src.port == dns_server.port
        assert states(await src.fetch()) == {"aa1": InstanceState.UP}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fdaa::3", ("fdaa::3", 53)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("localhost:5353", ("localhost", 5353)),
    ],
)
def test_split_server(text: str, expected: tuple[str, int]) -> None:
    assert split_server(text, 53) == expected


@pytest.mark.parametrize("text", ["resolver", "host:", ":53", "[::1]", "h:70000", "h:0"])
def test_split_server_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="dns_server"):
        split_server(text, 53)


async def test_discovery_loop_feeds_membership(dns_server: DnsServer) -> None:
    """FlyDnsSource under the real discovery loop: stopped Machines stay routable, destroyed ones
    become gone, and a DNS outage keeps the last membership."""
    from affinity_proxy._tasks import TaskSet
    from affinity_proxy.membership.discovery import run_discovery
    from affinity_proxy.membership.registry import Membership
    from tests.support.waiting import wait_until

    local = Instance(InstanceId(LOCAL), "http://127.0.0.1:3000", 1, InstanceState.UP, "ams", True)
    membership = Membership([local])
    dns_server.set_txt(VMS, f"{LOCAL} ams,bb2 fra")
    dns_server.set_txt(ALL, f"{LOCAL} ams,bb2 fra,cc3 lhr")
    errors: list[int] = []
    tasks = TaskSet()
    tasks.spawn(run_discovery(source(dns_server, timeout=0.2), membership, local=local, interval=0.02,
                              on_error=lambda: errors.append(1)), name="discovery")
    try:
        view = membership.current
        await wait_until(lambda: view().state_of("cc3") is InstanceState.STOPPED)
        assert view().state_of("bb2") is InstanceState.UP and view().is_routable("cc3")
        assert view().choose_new("user") in (LOCAL, "bb2")  # a stopped Machine gets no new users
        dns_server.set_txt(VMS, f"{LOCAL} ams")
        dns_server.set_txt(ALL, f"{LOCAL} ams,cc3 lhr")  # bb2 destroyed
        await wait_until(lambda: view().state_of("bb2") is InstanceState.GONE)
        dns_server.silent = True
        await wait_until(lambda: len(errors) >= 2)
        assert {i.id for i in view().instances} == {LOCAL, "cc3"}  # last good list kept
        dns_server.silent = False
        dns_server.set_nxdomain(VMS)  # even this node's Machine missing from vms: it stays up and local
        before = membership.current().epoch
        await wait_until(lambda: view().epoch > before + 1 and view().state_of("cc3") is InstanceState.STOPPED)
        assert view().state_of(LOCAL) is InstanceState.UP and view().get(LOCAL).local  # type: ignore[union-attr]
    finally:
        await tasks.close()
    assert tasks.crashes == 0


# ---------------------------------------------------------------------------- process groups

WEB2, WORKER, STOPPED_WEB, STOPPED_WORKER = "2871e9dae67d58", "6830d10c463198", "1857961b2d73e8", "185e276f707e78"
GROUP = f"web.process.{APP}.internal"
ADDR = {LOCAL: "fdaa:0:1:a7b:1::2", WEB2: "fdaa:0:1:a7b:1::3", WORKER: "fdaa:0:1:a7b:1::4",
        STOPPED_WEB: "fdaa:0:1:a7b:1::5", STOPPED_WORKER: "fdaa:0:1:a7b:1::6"}


def _vm(machine_id: str) -> str:
    return f"{machine_id}.vm.{APP}.internal"


def _start(server: DnsServer, started: dict[str, str], stopped: tuple[str, ...] = ()) -> None:
    """``started``: Machine id -> group; the group record holds the web Machines' addresses."""
    server.set_txt(VMS, ",".join(f"{m} ams" for m in started))
    server.set_txt(ALL, ",".join(f"{m} ams" for m in (*started, *stopped)))
    for m in ADDR:
        if m in started:
            server.set_aaaa(_vm(m), ADDR[m])
        else:
            server.set_nxdomain(_vm(m))
    server.set_aaaa(GROUP, *(ADDR[m] for m, g in started.items() if g == "web"))


async def test_process_group_keeps_only_that_groups_machines(dns_server: DnsServer) -> None:
    """A worker is started: its address is not in ``web.process``, so it is left out. A stopped
    Machine nobody saw started is kept with weight 0 (its pins stay, no new ones)."""
    _start(dns_server, {LOCAL: "web", WEB2: "web", WORKER: "worker"}, stopped=(STOPPED_WEB,))
    src = source(dns_server, process_group="web")
    found = {i.id: (i.state, i.weight) for i in await src.fetch()}
    assert found == {LOCAL: (InstanceState.UP, 1), WEB2: (InstanceState.UP, 1),
                     STOPPED_WEB: (InstanceState.STOPPED, 0)}
    assert dns_server.query_count(GROUP) == 1
    assert all(dns_server.query_count(_vm(m)) == 1 for m in (LOCAL, WEB2, WORKER))
    assert dns_server.query_count(_vm(STOPPED_WEB)) == 0, "a stopped Machine has no address to look up"
    # a second round looks nothing up again per Machine: addresses are cached
    await src.fetch()
    assert all(dns_server.query_count(_vm(m)) == 1 for m in (LOCAL, WEB2, WORKER))


async def test_process_group_remembers_groups_of_machines_seen_started(dns_server: DnsServer) -> None:
    _start(dns_server, {LOCAL: "web", WEB2: "web", WORKER: "worker"})
    src = source(dns_server, process_group="web")
    await src.fetch()
    _start(dns_server, {LOCAL: "web"}, stopped=(WEB2, WORKER))  # both autostopped
    found = {i.id: (i.state, i.weight) for i in await src.fetch()}
    assert found == {LOCAL: (InstanceState.UP, 1), WEB2: (InstanceState.STOPPED, 1)}, "the worker stays out"
    _start(dns_server, {LOCAL: "web"}, stopped=(WEB2,))  # the worker is destroyed: forgotten
    await src.fetch()
    _start(dns_server, {LOCAL: "web", WORKER: "web"}, stopped=(WEB2,))  # a new Machine with that id, in web
    found = {i.id: (i.state, i.weight) for i in await src.fetch()}
    assert found[InstanceId(WORKER)] == (InstanceState.UP, 1)


async def test_process_group_looks_again_when_a_machine_changes_address(dns_server: DnsServer) -> None:
    _start(dns_server, {LOCAL: "web", WEB2: "web"})
    src = source(dns_server, process_group="web")
    assert {i.id for i in await src.fetch()} == {LOCAL, WEB2}
    dns_server.set_aaaa(_vm(WEB2), "fdaa:0:1:a7b:1::99")  # rebooted with a new 6PN address
    dns_server.set_aaaa(GROUP, ADDR[LOCAL], "fdaa:0:1:a7b:1::99")
    assert {(i.id, i.weight) for i in await src.fetch()} == {(LOCAL, 1), (WEB2, 1)}
    assert dns_server.query_count(_vm(WEB2)) == 2


async def test_process_group_without_addresses_is_an_error(dns_server: DnsServer) -> None:
    """No address for the group at all (this node's own Machine is started): a wrong group name
    or a resolver fault, never "no Machine of the group"."""
    _start(dns_server, {LOCAL: "web", WEB2: "web"})
    dns_server.set_nxdomain(GROUP)
    with pytest.raises(DiscoveryError, match="process_group"):
        await source(dns_server, process_group="web").fetch()
    dns_server.set_servfail(GROUP)
    with pytest.raises(DiscoveryError, match="SERVFAIL"):
        await source(dns_server, process_group="web").fetch()


async def test_process_group_per_machine_lookup_failures(dns_server: DnsServer) -> None:
    _start(dns_server, {LOCAL: "web", WEB2: "web"})
    dns_server.set_servfail(_vm(WEB2))
    with pytest.raises(DiscoveryError, match="SERVFAIL"):
        await source(dns_server, process_group="web").fetch()
    dns_server.set_nxdomain(_vm(WEB2))  # listed as started but no longer resolves: stopped meanwhile
    found = {i.id: (i.state, i.weight) for i in await source(dns_server, process_group="web").fetch()}
    assert found == {LOCAL: (InstanceState.UP, 1), WEB2: (InstanceState.STOPPED, 0)}


async def test_process_group_silent_server_times_out(dns_server: DnsServer) -> None:
    _start(dns_server, {LOCAL: "web"})
    src = source(dns_server, process_group="web", timeout=0.3)
    await src.fetch()
    dns_server.set_txt(VMS, f"{LOCAL} ams,{WEB2} ams")
    dns_server.set_txt(ALL, f"{LOCAL} ams,{WEB2} ams")
    dns_server.set_aaaa(GROUP, ADDR[LOCAL], ADDR[WEB2])
    dns_server.set_silent(_vm(WEB2))  # the TXT and group answers come; one Machine's never does
    with pytest.raises(DiscoveryError, match="no answer"):
        await src.fetch()
    dns_server.set_silent(_vm(WEB2), False)
    assert {i.id for i in await src.fetch()} == {LOCAL, WEB2}


async def test_without_process_group_no_aaaa_is_asked(dns_server: DnsServer) -> None:
    _start(dns_server, {LOCAL: "web", WORKER: "worker"})
    assert {i.id for i in await source(dns_server, process_group=None).fetch()} == {LOCAL, WORKER}
    assert not any(q[1] == "AAAA" for q in dns_server.queries)
