"""Where a new session goes: consistent hashing with bounded loads on live sessions (issue #14).

Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads" (SODA 2018): walk the
ring from the key's point and take the first instance whose load after this placement stays within
``load_factor`` x its weighted share of the total. Unlike HAProxy's and Envoy's ``hash_balance_factor``
(in-flight requests), the load here is *live sessions*, which is what a stateful app pays for.

Pure: imports only ``routing.model`` and ``routing.ring``; the loads come in as a snapshot, so the
caller decides how fresh they are (``decide`` calls it with ``RouteInput.loads``, which
``placement.live`` keeps; see README "Placement").
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from itertools import chain

from affinity_proxy.routing.model import InstanceId, MembershipView
from affinity_proxy.routing.ring import HashRing

DEFAULT_LOAD_FACTOR = 1.25


class PlacementHow(StrEnum):
    """How a new pin was placed; the ``how`` label of ``affinity_placements_total``."""

    RING = "ring"  # the key's own ring choice had room
    OVERFLOW = "overflow"  # it was full; the walk went on to a later instance
    LOCAL = "local"  # fly placement ``local`` (set by the caller, never by ``place``)


@dataclass(frozen=True, slots=True)
class Placement:
    """The chosen instance and how it was reached."""

    instance: InstanceId
    how: PlacementHow


def load_factor_fraction(load_factor: float | None) -> Fraction | None:
    """The load factor as an exact fraction; None when bounded load is off (``0`` or ``None``).

    Raises ValueError below 1: a bound under the mean can leave no instance with room.
    """
    if load_factor is None or load_factor == 0:
        return None
    if not isinstance(load_factor, int | float | Fraction) or isinstance(load_factor, bool):
        raise ValueError(f"load_factor must be a number >= 1, 0 or None, not {load_factor!r}")
    if not math.isfinite(load_factor):
        raise ValueError(f"load_factor must be finite, not {load_factor!r}")
    value = Fraction(load_factor).limit_denominator(1_000_000)
    if value < 1:
        raise ValueError(f"load_factor must be >= 1 (or 0/None to disable), not {load_factor!r}")
    return value


def capacity(total: int, weight: int, total_weight: int, factor: Fraction) -> int:
    """``ceil(factor * total * weight / total_weight)``, in exact integer arithmetic.

    The ceiling is what guarantees a feasible instance: the capacities add up to at least ``total``.
    """
    num = factor.numerator * total * weight
    den = factor.denominator * total_weight
    return -(-num // den)


def placement_ring(view: MembershipView, exclude: Collection[str] = ()) -> HashRing:
    """The ring new pins are placed on: ``up`` instances, else any routable one (as ``choose_new``)."""
    if any(node not in exclude for node in view.ring.weights):
        return view.ring
    return view.fallback_ring


def _checked_load(loads: Mapping[str, int], node: str) -> int:
    value = loads.get(node, 0)
    if value < 0:
        raise ValueError(f"live-session count of {node!r} is negative: {value}")
    return value


def place(
    view: MembershipView,
    key: str,
    loads: Mapping[str, int],
    load_factor: float | None = DEFAULT_LOAD_FACTOR,
    exclude: Collection[str] = frozenset(),
) -> Placement | None:
    """The instance for a new session of ``key``, or None when no instance can take it.

    ``loads``: live sessions per instance (missing = 0). The bound is taken over the instances of the
    placement ring minus ``exclude`` (draining, down and gone instances are not on it), weights
    respected; with ``load_factor`` 0/None this is the plain ring choice. Cost: one ring walk, O(n)
    in the worst case plus O(n) to total the loads. Raises ValueError for a load factor below 1 or
    a negative load.
    """
    factor = load_factor_fraction(load_factor)
    ring = placement_ring(view, exclude)
    candidates = {node: w for node, w in ring.weights.items() if node not in exclude}
    if not candidates:
        return None
    walk = (node for node in ring.walk(key) if node not in exclude)
    first = next(walk)
    if factor is None:
        return Placement(InstanceId(first), PlacementHow.RING)
    total_after = sum(_checked_load(loads, node) for node in candidates) + 1
    total_weight = sum(candidates.values())
    for node in chain((first,), walk):
        if _checked_load(loads, node) + 1 <= capacity(total_after, candidates[node], total_weight, factor):
            return Placement(InstanceId(node), PlacementHow.RING if node == first else PlacementHow.OVERFLOW)
    # Unreachable: the capacities add up to at least total_after > the sum of the loads.
    raise AssertionError("bounded-load walk found no instance with room")

