"""FlyDnsSource: the app's Machines from Fly's internal DNS (``fly.discovery: dns``).

Two TXT look-ups per ``fetch``, made together through the resolver at ``fdaa::3`` (configurable, so
tests run a DNS server on loopback):

- ``vms.<app>.internal``: the *started* Machines, ``"<id> <region>,<id> <region>,..."``;
- ``all.vms.<app>.internal``: every deployed Machine, stopped and suspended ones included.

Started Machines are ``up``; deployed but not started ones are ``stopped`` (a replay wakes them, so
their pins are kept); a Machine in neither record is left out, which the ``Membership`` turns into
``gone`` (destroyed, e.g. by a bluegreen deploy). The TXT format is documented only loosely (docs/fly-protocol.md
section 4), so parsing is tolerant: the strings of one record are joined before splitting (DNS cuts
long TXT data into 255-byte strings anywhere), blanks and empty entries are ignored, and an entry
whose id is not a valid instance id is skipped with a debug log.

With ``process_group`` (``fly.process_group``) only that group's Machines are kept. ``vms.`` is not
filtered by group and ``<group>.process.<app>.internal`` gives addresses only (AAAA, started
Machines only; docs/fly-protocol.md §4), so a started Machine is in the group when the address of
its own name ``<id>.vm.<app>.internal`` is among the group's addresses. Addresses are cached per
Machine and looked up again only for new Machines, or for all when a group address matches no
cached one (a Machine got a new address). What was learned about a Machine while it was started is
kept for when it is stopped; a stopped Machine this node never saw started (its group is unknown
to DNS) is kept with weight 0: it keeps the pins it has (a web Machine autostopped before this
node started must not lose its users) and never gets a new one.

Uses dnspython's asyncio resolver. Imports only ``routing.model`` and ``membership.sources``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import replace

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from affinity_proxy.membership.sources import DiscoveryError, MachineAddressing
from affinity_proxy.routing.model import Instance, InstanceState, is_valid_instance_id

log = logging.getLogger("affinity_proxy.discovery.dns")

_REGION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
EDNS_PAYLOAD = 1232  # the DNS-flag-day size: no IP fragmentation; larger answers come over TCP
LOOKUP_CONCURRENCY = 16  # per-Machine AAAA look-ups in flight at once (process groups)


def parse_vms_txt(records: Iterable[str]) -> dict[str, str]:
    """``{machine id: region}`` from the TXT records of ``vms.``/``all.vms.<app>.internal``, in order.

    Each item is one record with its strings already joined. Entries are separated by commas and
    hold an id, whitespace and a region; extra words are ignored, a missing or malformed region
    becomes ``""``, and entries without a valid id are skipped (debug log). Pure, no I/O.
    """
    found: dict[str, str] = {}
    for record in records:
        for raw in record.split(","):
            words = raw.split()
            if not words:
                continue
            machine_id, region = words[0], (words[1] if len(words) > 1 else "")
            if not is_valid_instance_id(machine_id):
                log.debug("skipping a vms TXT entry with an invalid machine id: %r", raw.strip())
                continue
            if len(words) > 2 or (region and not _REGION.fullmatch(region)):
                log.debug("unexpected vms TXT entry %r; keeping machine %s", raw.strip(), machine_id)
                region = region if _REGION.fullmatch(region) else ""
            found.setdefault(machine_id, region)
    return found


def split_server(dns_server: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` from ``fdaa::3``, ``127.0.0.1``, ``127.0.0.1:5353``, ``[::1]:5353`` or
    ``localhost:5353``; a bare address uses ``default_port``. Raises ``ValueError``."""
    text = dns_server.strip()
    try:
        return str(ipaddress.ip_address(text)), default_port
    except ValueError:
        pass
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"dns_server must be an address, optionally with a port, got {dns_server!r}")
    return host, int(port_text)


class FlyDnsSource:
    """``MembershipSource`` over Fly's internal DNS; see the module docstring for the rules.

    ``fetch`` sends two TXT queries at once (UDP, TCP when the answer is truncated), each bounded
    by ``timeout`` seconds in all (a lost UDP packet is re-sent once, halfway). NXDOMAIN or no TXT
    data for ``vms.`` means no Machine is started: not an error. Raises ``DiscoveryError`` on a
    timeout, SERVFAIL/REFUSED or a socket error, and also when ``all.vms.`` names no Machine at all
    (NXDOMAIN, no data, nothing parseable): this node's own Machine is deployed, so such an answer
    is a resolver fault or a wrong ``app``, and taking it as the truth would mark every Machine gone
    and re-pin every user. Nothing is cached between calls; call from one task at a time.
    """

    def __init__(
        self,
        app: str,
        *,
        local_machine_id: str,
        dns_server: str = "fdaa::3",
        port: int = 53,
        timeout: float = 2.0,
        private_url: str,
        private_port: int,
        local_upstream: str,
        process_group: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.app = app
        self.timeout = timeout
        self.host, self.port = split_server(dns_server, port)
        self.addressing = MachineAddressing(app, local_machine_id, local_upstream, private_url, private_port)
        self.started_name = dns.name.from_text(f"vms.{app}.internal.")
        self.all_name = dns.name.from_text(f"all.vms.{app}.internal.")
        self.process_group = process_group or None
        self.group_name = dns.name.from_text(f"{process_group}.process.{app}.internal.") if process_group else None
        self._addresses: dict[str, frozenset[str]] = {}  # Machine id -> AAAA of <id>.vm.<app>.internal
        self._in_group: dict[str, bool] = {}  # learned while the Machine was started
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout / 2
        self._resolver.use_edns(0, 0, EDNS_PAYLOAD)
        self._resolver.cache = None

    def __repr__(self) -> str:
        return f"FlyDnsSource(app={self.app!r}, server={self.server!r})"

    @property
    def server(self) -> str:
        """The resolver as ``host:port`` (IPv6 in brackets), for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def fetch(self) -> list[Instance]:
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver(await self._server_ip(), self.port)]
        try:
            async with asyncio.timeout(self.timeout):  # dnspython may back off past its lifetime
                results = await asyncio.gather(
                    self._txt(self.started_name), self._txt(self.all_name), return_exceptions=True
                )
        except TimeoutError:
            raise DiscoveryError(
                f"DNS TXT {self.started_name} and {self.all_name} at {self.server}: no answer within {self.timeout}s"
            ) from None
        for result in results:
            if isinstance(result, BaseException):
                raise result
        started_txt, all_txt = results
        assert not isinstance(started_txt, BaseException) and not isinstance(all_txt, BaseException)
        started = parse_vms_txt(started_txt or ())
        deployed = parse_vms_txt(all_txt or ())
        if not deployed:
            what = "does not exist (NXDOMAIN)" if all_txt is None else "names no machine"
            raise DiscoveryError(f"{self.all_name} {what} at {self.server}; is fly.app {self.app!r} right?")
        if self.group_name is not None:
            return await self._of_group(started, deployed)
        out = [self.addressing.instance(mid, region, InstanceState.UP) for mid, region in started.items()]
        out.extend(
            self.addressing.instance(mid, region, InstanceState.STOPPED)
            for mid, region in deployed.items()
            if mid not in started
        )
        return out

    async def _of_group(self, started: dict[str, str], deployed: dict[str, str]) -> list[Instance]:
        """The Machines of ``process_group`` (module docstring). Raises ``DiscoveryError``."""
        assert self.group_name is not None
        try:
            async with asyncio.timeout(self.timeout):
                group = await self._aaaa(self.group_name)
                if not group:  # this node's own Machine is started and (normally) in the group
                    raise DiscoveryError(f"{self.group_name} has no address at {self.server}; "
                                         f"is fly.process_group {self.process_group!r} right?")
                await self._resolve([m for m in started if m not in self._addresses])
                known = set().union(*(self._addresses.get(m, frozenset()) for m in started))
                if group - known:  # a Machine of the group has an address we do not know: look again
                    await self._resolve(list(started))
        except TimeoutError:
            raise DiscoveryError(f"DNS AAAA look-ups for {self.group_name} at {self.server}: "
                                 f"no answer within {self.timeout}s") from None
        for mid in started:
            addresses = self._addresses.get(mid)
            if addresses:
                self._in_group[mid] = bool(addresses & group)
        for mid in list(self._addresses):
            if mid not in deployed:  # destroyed: forget it
                self._addresses.pop(mid, None)
                self._in_group.pop(mid, None)
        out: list[Instance] = []
        for mid, region in deployed.items():
            member = self._in_group.get(mid)
            if member is False:
                continue
            state = InstanceState.UP if mid in started and self._addresses.get(mid) else InstanceState.STOPPED
            inst = self.addressing.instance(mid, region, state)
            out.append(inst if member else replace(inst, weight=0))
        return out

    async def _resolve(self, machine_ids: list[str]) -> None:
        """Look up ``<id>.vm.<app>.internal`` AAAA for each, at most ``LOOKUP_CONCURRENCY`` at once;
        a name that does not resolve (the Machine stopped meanwhile) drops its cached addresses."""
        limit = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(mid: str) -> None:
            async with limit:
                found = await self._aaaa(dns.name.from_text(f"{mid}.vm.{self.app}.internal."))
            if found:
                self._addresses[mid] = frozenset(found)
            else:
                self._addresses.pop(mid, None)

        results = await asyncio.gather(*(one(m) for m in machine_ids), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _server_ip(self) -> str:
        try:
            ipaddress.ip_address(self.host)
            return self.host
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise DiscoveryError(f"cannot resolve the DNS server name {self.host!r}: {exc}") from exc
        return str(infos[0][4][0])

    async def _aaaa(self, name: dns.name.Name) -> set[str]:
        """The AAAA addresses of ``name`` (normalised text); empty for NXDOMAIN or no data."""
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.AAAA, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return set()
        except dns.resolver.LifetimeTimeout:
            raise DiscoveryError(f"DNS AAAA {name} at {self.server}: no answer within {self.timeout}s") from None
        except dns.resolver.NoNameservers as exc:
            raise DiscoveryError(f"DNS AAAA {name} at {self.server} failed: {_errors(exc)}") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise DiscoveryError(f"DNS AAAA {name} at {self.server} failed: {exc!r}") from None
        if answer.rrset is None:
            return set()
        return {str(ipaddress.ip_address(rdata.address)) for rdata in answer.rrset}

    async def _txt(self, name: dns.name.Name) -> list[str] | None:
        """The TXT records of ``name``, each with its strings joined; None for NXDOMAIN."""
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.TXT, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.resolver.LifetimeTimeout:
            raise DiscoveryError(f"DNS TXT {name} at {self.server}: no answer within {self.timeout}s") from None
        except dns.resolver.NoNameservers as exc:
            raise DiscoveryError(f"DNS TXT {name} at {self.server} failed: {_errors(exc)}") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise DiscoveryError(f"DNS TXT {name} at {self.server} failed: {exc!r}") from None
        if answer.rrset is None:
            return []
        return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset]


def _errors(exc: dns.resolver.NoNameservers) -> str:
    """The per-attempt errors of a failed resolution ("SERVFAIL", "ConnectionRefusedError(...)")."""
    errors = exc.kwargs.get("errors") or []
    texts = [str(err[3]) if isinstance(err[3], str) else repr(err[3]) for err in errors]
    return ", ".join(dict.fromkeys(texts)) or str(exc)
