"""Who the client really is: nginx's realip module (``real_ip_recursive on``) and ``$scheme``.

Forwarding headers (``X-Forwarded-For``, ``X-Forwarded-Proto``, ``Fly-Client-IP``,
``Fly-Forwarded-Proto``) are believed only when the TCP peer is one of ``trusted_proxies``; any
client can write them. From a trusted peer:

- the client address is ``Fly-Client-IP`` when it holds a valid address (Fly's edge sets it);
  otherwise ``X-Forwarded-For`` is walked from the right, skipping trusted addresses, and the first
  untrusted one is the client. If every entry is trusted, the leftmost is taken; an entry that is
  not an address ends the walk at the last good one (nginx's ``ngx_http_get_forwarded_addr``);
- the scheme is ``Fly-Forwarded-Proto`` or else the rightmost ``X-Forwarded-Proto`` entry when it
  says ``http`` or ``https``; anything else is ignored.

From any other peer the client is the peer and the scheme is the connection's own. Pure (stdlib
only); both engines call it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SCHEMES = ("http", "https")


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it in X-Forwarded-For: ``1.2.3.4``, ``1.2.3.4:5678``,
    ``2001:db8::1``, ``[2001:db8::1]`` or ``[2001:db8::1]:5678``; None for anything else."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not (text[end + 1] == ":" and text[end + 2:].isdigit())):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return address


#: Longest text that can be an address as written in X-Forwarded-For (``[v6]:port``); longer is not
#: looked at, so the memo below never holds a large attacker-chosen string.
_MAX_ADDRESS_TEXT = 64


@lru_cache(maxsize=4096)
def _canonical(text: str) -> str | None:
    address = parse_address(text)
    return str(address) if address is not None else None


def canonical_address(text: str) -> str | None:
    """``parse_address`` as text (``2001:DB8::1`` -> ``2001:db8::1``, the port dropped), memoized:
    on Fly every request carries a Fly-Client-IP and an X-Forwarded-For to walk."""
    text = text.strip()
    if not text or len(text) > _MAX_ADDRESS_TEXT:
        return None
    return _canonical(text)


class TrustedProxies:
    """A set of CIDRs and the question "is this peer one of them?", memoized per address (bounded:
    the memo is emptied when it holds ``MEMO_LIMIT`` addresses). Falsy when empty."""

    MEMO_LIMIT = 4096
    __slots__ = ("_memo", "networks")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def trusts(self, peer: str | None) -> bool:
        """True when ``peer`` (a TCP peer address as the socket reports it) is a trusted proxy."""
        if not self.networks or not peer:
            return False
        known = self._memo.get(peer)
        if known is None:
            address = parse_address(peer)
            known = address is not None and self.contains(address)
            if len(self._memo) >= self.MEMO_LIMIT:
                self._memo.clear()
            self._memo[peer] = known
        return known


@lru_cache(maxsize=8)
def trusted_proxies(cidrs: tuple[str, ...]) -> TrustedProxies:
    """One ``TrustedProxies`` per distinct config value (a reload that keeps it keeps the memo)."""
    return TrustedProxies(cidrs)


@dataclass(frozen=True, slots=True)
class RealClient:
    """The realip result for one request: ``ip`` (None only when the peer address is unknown),
    ``scheme`` (``http`` or ``https``) and whether the peer is a trusted proxy."""

    ip: str | None
    scheme: str
    trusted: bool


def client_address(proxies: TrustedProxies, peer: str | None, forwarded_for: Sequence[str],
                   fly_client_ip: str | None) -> str | None:
    """The client address for a request from ``peer`` (see the module docstring).
    ``forwarded_for``: every X-Forwarded-For line, in order. Pure; O(entries)."""
    if not proxies.trusts(peer):
        return peer
    if fly_client_ip:
        fly = canonical_address(fly_client_ip)
        if fly is not None:
            return fly
    found = peer
    entries = [e for line in forwarded_for for e in line.split(",")] if len(forwarded_for) > 1 \
        else forwarded_for[0].split(",") if forwarded_for else []
    for entry in reversed(entries):
        if not entry.strip():
            continue
        address = canonical_address(entry)
        if address is None:
            break  # nginx: stop at what is not an address, keep the last good one
        found = address
        if not proxies.trusts(address):
            break
    return found


def client_scheme(trusted: bool, connection_scheme: str, fly_proto: str | None,
                  forwarded_proto: Sequence[str]) -> str:
    """The scheme the client used: a trusted peer's ``Fly-Forwarded-Proto`` or rightmost
    ``X-Forwarded-Proto`` entry when it is ``http``/``https``, else ``connection_scheme``."""
    if trusted:
        if fly_proto is not None and fly_proto.strip().lower() in _SCHEMES:
            return fly_proto.strip().lower()
        entries = [e.strip().lower() for line in forwarded_proto for e in line.split(",") if e.strip()]
        if entries and entries[-1] in _SCHEMES:
            return entries[-1]
    return connection_scheme


def real_client(proxies: TrustedProxies, peer: str | None, connection_scheme: str, *,
                forwarded_for: Sequence[str] = (), forwarded_proto: Sequence[str] = (),
                fly_client_ip: str | None = None, fly_proto: str | None = None) -> RealClient:
    """``client_address`` and ``client_scheme`` together."""
    trusted = proxies.trusts(peer)
    if not trusted:
        return RealClient(peer, connection_scheme, False)
    return RealClient(client_address(proxies, peer, forwarded_for, fly_client_ip),
                      client_scheme(True, connection_scheme, fly_proto, forwarded_proto), True)
