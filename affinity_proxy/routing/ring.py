"""Consistent-hash ring over instance ids: uhashring in its ketama-compatible mode, weights honoured.

Pure: stdlib + uhashring. Built once per membership change (``MembershipView.build``), never per
request. uhashring builds the continuum (its points, ``get_points``); the look-ups are this
module's own over a copy of it, answering exactly what uhashring's ``get_node`` and
``iterate_nodes`` answer (``tests/routing/test_ring.py``) without their per-call overhead: a key
costs one md5 and one bisect (``position``), and a walk from a position is a scan of the points.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Collection, Iterator, Mapping
from itertools import chain, islice

from uhashring import HashRing as _UHashRing

try:  # CPython's own md5: no OpenSSL context to allocate for a 16-byte key (same digest)
    from _md5 import md5 as _md5
except ImportError:  # pragma: no cover - a build without the builtin hashes
    from hashlib import md5 as _md5

#: ketama's point of a key: the md5 digest's first 4 bytes, little-endian.
_ketama = struct.Struct("<I").unpack_from


class HashRing:
    """Weighted ketama ring. An empty ring chooses None."""

    __slots__ = ("_distinct", "_owners", "_points", "weights")

    def __init__(self, weights: Mapping[str, int]) -> None:
        self.weights: dict[str, int] = {k: int(w) for k, w in weights.items() if int(w) > 0}
        nodes = {node: {"weight": w} for node, w in sorted(self.weights.items())}
        points = _UHashRing(nodes, hash_fn="ketama").get_points() if nodes else []
        self._points: list[int] = [point for point, _ in points]  # sorted hashes (duplicates kept)
        self._owners: list[str] = [node for _, node in points]  # the instance at each point
        self._distinct = len(set(self._owners))  # instances on the continuum (a walk's length)

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def points(self) -> int:
        """How many points the continuum has (``position`` answers below this)."""
        return len(self._points)

    def position(self, key: str) -> int:
        """The index of the point owning ``key`` (ketama: the first point above the key's hash,
        wrapping to 0). The ring must not be empty."""
        points = self._points
        pos = bisect_right(points, _ketama(_md5(key.encode("utf-8")).digest())[0])
        return 0 if pos == len(points) else pos

    def owner(self, position: int) -> str:
        """The instance at ``position``: ``choose`` of the keys that hash there."""
        return self._owners[position]

    def walk_from(self, position: int) -> Iterator[str]:
        """Distinct instances in ring order from ``position`` (``iterate_nodes``' order)."""
        owners = self._owners
        size = self._distinct
        seen: set[str] = set()
        for node in chain(islice(owners, position, None), islice(owners, position)):
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == size:
                    return

    def choose(self, key: str, exclude: Collection[str] = ()) -> str | None:
        """The instance owning ``key``; walks the ring past ``exclude``d ids. None when none is left."""
        if not self._points:
            return None
        position = self.position(key)
        if not exclude:
            return self._owners[position]
        for node in self.walk_from(position):
            if node not in exclude:
                return node
        return None

    def walk(self, key: str) -> Iterator[str]:
        """Instances in ring order for ``key``, lazily: a bounded-load walk usually stops at the first."""
        if not self._points:
            return iter(())
        return self.walk_from(self.position(key))

    def preference(self, key: str) -> list[str]:
        """All instances in ring order for ``key`` (the fallback order a bounded-load walk uses)."""
        return list(self.walk(key))
