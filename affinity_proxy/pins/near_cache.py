"""PinNearCache: this process's memory of recently seen pins, consulted only when the store is down.

Without it, a user whose pin moved away from its hash instance (a re-pin after a failure, an
operator ``pins set``) would be sent back to the hash instance during a Redis outage and lose its
in-memory session there. The cache is bounded (LRU) and never used while the store answers, so a
stale entry can only matter during an outage, where it is still the best guess. No I/O, O(1).
"""

from __future__ import annotations

from collections import OrderedDict

from affinity_proxy.routing.model import InstanceId

DEFAULT_MAX_ENTRIES = 100_000  # about 10 MiB at typical key sizes


class PinNearCache:
    """Bounded LRU of user key -> instance. One per process (on ProxyContext); event-loop only."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._entries: OrderedDict[str, InstanceId] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, user_key: str, instance: InstanceId) -> None:
        entries = self._entries
        if entries.get(user_key) == instance:
            entries.move_to_end(user_key)
            return
        entries[user_key] = instance
        entries.move_to_end(user_key)
        if len(entries) > self._max:
            entries.popitem(last=False)

    def forget(self, user_key: str) -> None:
        self._entries.pop(user_key, None)

    def recall(self, user_key: str) -> InstanceId | None:
        return self._entries.get(user_key)
