"""Parse the distributed Redis store URLs: ``redis+cluster://`` and ``redis+sentinel://``.

Why a module of its own: config validation (``config_schema``) and the store factory must agree on
what is accepted, and ``urlsplit`` cannot read a comma-separated host list (``.port`` fails on it).

- ``redis+cluster://[user:password@]host:port[,host:port...][/]`` Redis Cluster; the hosts are seeds,
  the client learns the rest of the cluster from them. No database number (a cluster has only 0).
- ``redis+sentinel://[user:password@]host:port[,host:port...]/MASTER_NAME[/db]`` the hosts are
  Sentinels; the credentials are the master's (Sentinels themselves are reached without them).

Pure: no I/O, stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
DISTRIBUTED_SCHEMES = (CLUSTER_SCHEME, SENTINEL_SCHEME)

_URL = re.compile(r"^(?P<scheme>[a-z+]+)://(?:(?P<userinfo>[^@/]*)@)?(?P<hosts>[^/?#]*)(?P<path>/[^?#]*)?$")
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})$")
_MASTER = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where a distributed store URL points. ``master`` and ``db`` are Sentinel-only."""

    scheme: str
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    master: str | None = None
    db: int = 0


def parse_distributed_url(url: str) -> RedisTarget:
    """The target of a ``redis+cluster://`` or ``redis+sentinel://`` URL; ValueError saying what is
    wrong (without echoing credentials) otherwise."""
    match = _URL.match(url)
    if match is None:
        raise ValueError("is not a valid URL: expected scheme://host:port[,host:port...][/...]")
    scheme = match["scheme"]
    if scheme not in DISTRIBUTED_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(DISTRIBUTED_SCHEMES)}")
    example = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000" if scheme == CLUSTER_SCHEME else \
        "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
    nodes = []
    for item in match["hosts"].split(","):
        host = _HOST.match(item.strip())
        port = int(host["port"]) if host else 0
        if host is None or not 0 < port < 65536:
            raise ValueError(f"every host needs host:port with a port in 1-65535, like {example}")
        nodes.append((host["v6"] or host["name"], port))
    username = password = None
    if match["userinfo"] is not None:
        user, sep, secret = match["userinfo"].partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    segments = [s for s in (match["path"] or "").split("/") if s]
    if scheme == CLUSTER_SCHEME:
        if segments and segments != ["0"]:
            raise ValueError(f"a Redis Cluster has no database numbers and the URL takes no path, like {example}")
        return RedisTarget(scheme, tuple(nodes), username, password)
    if not segments or len(segments) > 2 or not _MASTER.match(segments[0]):
        raise ValueError(f"must name the master after the Sentinel hosts, like {example}")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError(f"the database after the master name must be a number, like {example}")
    db = int(segments[1]) if len(segments) == 2 else 0
    return RedisTarget(scheme, tuple(nodes), username, password, segments[0], db)
