"""PinNearCache: this process's memory of recently seen pins, consulted only when the store is down.

Without it, a user whose pin moved away from its hash instance (a re-pin after a failure, an
operator ``pins set``) would be sent back to the hash instance during a Redis outage and lose its
in-memory session there. The cache is bounded (LRU). While the store answers it is used for one
thing only: a pin this process saw *before* a store outage (``outage``) that the store no longer
holds (Redis came back empty) is claimed again on the instance remembered (``recall_lost``), so
every node that knew the user restores the same pin instead of placing the user afresh (bounded
load on each node's own snapshot would pick differently). A pin dropped while the store was up
(operator ``pins drop``, expiry) is not restored. No I/O, O(1).
"""

from __future__ import annotations

from collections import OrderedDict

from affinity_proxy.routing.model import InstanceId

DEFAULT_MAX_ENTRIES = 100_000  # about 10 MiB at typical key sizes


class PinNearCache:
    """Bounded LRU of user key -> (instance, outage epoch when last confirmed by the store). One per
    process (on ProxyContext); event-loop only."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._entries: OrderedDict[str, tuple[InstanceId, int]] = OrderedDict()
        self._max = max_entries
        self._epoch = 0  # store outages seen by this process (``outage``)

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, user_key: str, instance: InstanceId) -> None:
        entries = self._entries
        entry = (instance, self._epoch)
        if entries.get(user_key) == entry:
            entries.move_to_end(user_key)
            return
        entries[user_key] = entry
        entries.move_to_end(user_key)
        if len(entries) > self._max:
            entries.popitem(last=False)

    def forget(self, user_key: str) -> None:
        self._entries.pop(user_key, None)

    def outage(self) -> None:
        """A store call failed: every pin remembered so far may be lost if the store comes back empty."""
        self._epoch += 1

    def recall(self, user_key: str) -> InstanceId | None:
        entry = self._entries.get(user_key)
        return entry[0] if entry is not None else None

    def recall_lost(self, user_key: str) -> InstanceId | None:
        """The instance remembered for ``user_key`` if the store was last seen holding that pin
        before an outage (so a missing pin now means the store lost it), else None."""
        entry = self._entries.get(user_key)
        return entry[0] if entry is not None and entry[1] < self._epoch else None
