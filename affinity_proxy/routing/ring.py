"""Consistent-hash ring over instance ids: uhashring in its ketama-compatible mode, weights honoured.

Pure: stdlib + uhashring. Built once per membership change (``MembershipView.build``), never per
request. ``choose`` is a bisect on the continuum: no I/O, no allocation beyond the md5 of the key.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

from uhashring import HashRing as _UHashRing


class HashRing:
    """Weighted ketama ring. An empty ring chooses None."""

    __slots__ = ("_ring", "weights")

    def __init__(self, weights: Mapping[str, int]) -> None:
        self.weights: dict[str, int] = {k: int(w) for k, w in weights.items() if int(w) > 0}
        nodes = {node: {"weight": w} for node, w in sorted(self.weights.items())}
        self._ring = _UHashRing(nodes, hash_fn="ketama") if nodes else None

    def __len__(self) -> int:
        return len(self.weights)

    def choose(self, key: str, exclude: Collection[str] = ()) -> str | None:
        """The instance owning ``key``; walks the ring past ``exclude``d ids. None when none is left."""
        if self._ring is None:
            return None
        if not exclude:
            return self._ring.get_node(key)
        for node in self._ring.iterate_nodes(key, distinct=True):
            if node not in exclude:
                return node
        return None

    def walk(self, key: str) -> Iterator[str]:
        """Instances in ring order for ``key``, lazily: a bounded-load walk usually stops at the first."""
        if self._ring is None:
            return iter(())
        return iter(self._ring.iterate_nodes(key, distinct=True))

    def preference(self, key: str) -> list[str]:
        """All instances in ring order for ``key`` (the fallback order a bounded-load walk uses)."""
        if self._ring is None:
            return []
        return list(self._ring.iterate_nodes(key, distinct=True))
