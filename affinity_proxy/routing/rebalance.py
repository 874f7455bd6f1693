"""Which idle pins to move so that instances over their share come back toward it (issue #14).

After a scale-up the ring sends only *new* users to the new instance; long sessions keep the old
ones overloaded for hours. The planner picks pins idle for at least ``idle_after`` on instances above
their weighted share (draining instances: share 0) and names, for each, the first instance on the
user's own ring walk that stays within its share after the move, at most ``max_moves`` in all. A user
active within ``idle_after`` is never moved.

Pure: imports only ``routing.model``, ``routing.placement`` and ``routing.ring``; ``now`` and the
pin activity are inputs. ``placement.rebalancer`` runs it in a leader-only loop and applies the moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from affinity_proxy.routing.model import InstanceId, InstanceState, MembershipView
from affinity_proxy.routing.placement import capacity, placement_ring

DEFAULT_TOLERANCE = 0.05
_ONE = Fraction(1)


@dataclass(frozen=True, slots=True)
class Move:
    """Re-pin ``user_key`` from ``source`` to ``target`` (re-pin reason ``rebalance``)."""

    user_key: str
    source: InstanceId
    target: InstanceId


def over_share(view: MembershipView, loads: Mapping[str, int], instance: str,
               tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """True when ``instance`` holds more live sessions than ``(1 + tolerance)`` x its weighted share
    of the placement ring's total (the planner's source test), or is routable but off the ring
    (draining) with any session. O(instances)."""
    weights = placement_ring(view).weights
    load = loads.get(instance, 0)
    if instance not in weights:
        return load > 0 and view.is_routable(instance)
    total = sum(loads.get(node, 0) for node in weights)
    slack = _ONE + Fraction(tolerance).limit_denominator(1_000_000)
    return load > capacity(total, weights[instance], sum(weights.values()), slack)


def _validate(now: float, idle_after: float, max_moves: int, tolerance: float) -> None:
    if idle_after < 0:
        raise ValueError(f"idle_after must be >= 0, not {idle_after!r}")
    if isinstance(max_moves, bool) or not isinstance(max_moves, int) or max_moves < 0:
        raise ValueError(f"max_moves must be an int >= 0, not {max_moves!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, not {tolerance!r}")
    if now != now:
        raise ValueError("now is NaN")


def plan_rebalance(
    view: MembershipView,
    pins_by_instance: Mapping[str, Iterable[tuple[str, float]]],
    loads: Mapping[str, int],
    now: float,
    idle_after: float,
    max_moves: int,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[Move]:
    """The moves, in order; applying them all keeps every target within its share.

    ``pins_by_instance``: per instance, ``(user_key, last_active)`` of its stored pins, in the order
    they should be considered (e.g. least recently active first); only the instances over their
    share are read, and only until the budget is spent. ``loads``: live sessions per instance (pins
    plus anonymous sessions, which cannot be moved here). An instance on the placement ring is a
    source when its load exceeds ``ceil((1 + tolerance) * share)`` and gives up pins down to
    ``ceil(share)``; a draining instance gives up every idle pin. Down and gone instances are left
    to ``decide`` (their users re-pin at their next request). Raises ValueError on bad arguments.
    """
    _validate(now, idle_after, max_moves, tolerance)
    ring = placement_ring(view)
    weights = ring.weights
    if not weights or max_moves == 0:
        return []
    work = {node: int(n) for node, n in loads.items()}
    if any(n < 0 for n in work.values()):
        raise ValueError("a live-session count is negative")
    total_weight = sum(weights.values())
    total = sum(work.get(node, 0) for node in weights)
    slack = _ONE + Fraction(tolerance).limit_denominator(1_000_000)
    sources: list[tuple[int, Fraction, str]] = []
    for inst in view.instances:
        node, load = inst.id, work.get(inst.id, 0)
        if node in weights:
            if load > capacity(total, weights[node], total_weight, slack):
                sources.append((1, -Fraction(load, weights[node]), node))
        elif inst.state is InstanceState.DRAINING and load > 0:
            sources.append((0, Fraction(0), node))
    moves: list[Move] = []
    for _, _, source in sorted(sources):
        on_ring = source in weights
        for user_key, last_active in pins_by_instance.get(source, ()):
            if len(moves) >= max_moves:
                return moves
            if work[source] <= 0 or (on_ring and work[source] <= capacity(total, weights[source], total_weight, _ONE)):
                break
            if not now - last_active >= idle_after:
                continue  # active (or a last_active in the future): never moved
            after = total if on_ring else total + 1
            target = next(
                (
                    node
                    for node in ring.walk(user_key)
                    if node != source and work.get(node, 0) + 1 <= capacity(after, weights[node], total_weight, _ONE)
                ),
                None,
            )
            if target is None:
                break  # no instance has room below its share: nothing more to gain from this source
            moves.append(Move(user_key, InstanceId(source), InstanceId(target)))
            work[source] -= 1
            work[target] = work.get(target, 0) + 1
            total = after
    return moves
