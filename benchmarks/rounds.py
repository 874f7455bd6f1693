"""The figures of a benchmark run, pure: same-round ratios, medians with their spread, flagged rounds.

A ratio is always taken inside one round (numerator and denominator measured minutes apart, so a
busy machine skews both alike), and a run's figure is the median of its per-round ratios, shown
with their min-max. A round is *flagged* when its reference looks off: the reference proxy's req/s
per core of CPU far from the run's median, the direct backend's ratio to nginx far from the run's
median, or other work on the machine taking CPU during a measurement. Flagged rounds stay in the
tables and the all-rounds medians; the medians without them are given separately. Tested in
tests/benchmarks/test_benchmarks_harness.py; ``run.py`` measures and writes.

A round may measure each target in several *legs* (``--legs K``: K wrk runs of D/K seconds, the
round's targets swept forward, backward, forward, ... so that every target's legs spread evenly over
the round and all targets see the same drift of the machine's speed). ``combine_legs`` makes a
target's one row of the round from its legs: requests over seconds, errors and CPU-seconds summed,
and the percentiles of the merged latency distribution (``mixture_quantile``), not averages of the
legs' percentiles.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

REFERENCE = "nginx-proxy"  # pinned sessions (cookie sent): every ratio against nginx's cookie hash
NEW_SESSION_REFERENCE = "haproxy-insert"  # new sessions (no cookie): against HAProxy's cookie insert
CEILING = "byte-relay"  # the minimal Python byte relay: what Python can reach on this machine
DIRECT = "direct"  # the backend without a proxy: its ratio to nginx says whether nginx ran as usual

#: A round is flagged when a reference figure is more than this fraction away from the run's median.
TOLERANCE = 0.15
#: ... or when other work took more than this many cores (CPU-seconds per second) during a measurement.
OTHER_CPU_LIMIT = 0.25


@dataclass(frozen=True, slots=True)
class Row:
    """One target measured once (one round). ``cpu`` is the target's CPU use in cores (1.0 = one
    core busy); ``other_cpu`` what the machine spent on anything but the benchmark's processes
    (the target, the backends, wrk, the harness) during the measurement, steal time included."""

    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu: float | None
    other_cpu: float | None = None
    reference: str = REFERENCE
    rps_ratio: float | None = None  # against ``reference`` measured in the same round
    p99_ratio: float | None = None
    ceiling_ratio: float | None = None  # req/s against the byte relay of the same round


@dataclass(frozen=True, slots=True)
class Leg:
    """One wrk run against a target, a part of its measurement in a round. ``seconds`` is wrk's own
    duration of the run (requests / wrk's req/s); ``latency_grid`` the latency distribution as
    ``(percentile, ms)`` points in increasing order of percentile (0 = min, 100 = max; empty when wrk
    ran without the Lua script: then ``p50_ms``/``p99_ms``, wrk's own, are all there is).
    ``cpu_seconds`` is the target's CPU time during the run and ``elapsed`` the run's wall time."""

    target: str
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    latency_grid: tuple[tuple[float, float], ...] = ()
    cpu_seconds: float | None = None
    elapsed: float = 0.0
    other_cpu: float | None = None
    reference: str = REFERENCE

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def _cdf_points(grid: Sequence[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """``(value, lowest percentile, highest percentile)`` per distinct value of a grid, in increasing
    order (a value several percentiles share is a step of the CDF: wrk's histogram is in whole
    microseconds). Values are made non-decreasing in the percentile."""
    out: list[tuple[float, float, float]] = []
    top = float("-inf")
    for pct, value in sorted(grid):
        top = max(top, value)
        if out and out[-1][0] == top:
            out[-1] = (top, out[-1][1], pct)
        else:
            out.append((top, pct, pct))
    return out


def _cdf(points: Sequence[tuple[float, float, float]], x: float, *, left: bool = False) -> float:
    """The CDF (in percent) at ``x`` of a distribution given by ``_cdf_points``, or its limit from the
    left: linear between the highest percentile at one value and the lowest at the next, a step at a
    value several percentiles share; 0 below the first value, the last percentile from the last on."""
    if not points or x < points[0][0] or (left and x == points[0][0]):
        return 0.0
    lo, hi = 0, len(points) - 1
    if x >= points[hi][0]:
        return points[hi][1] if left and x == points[hi][0] else points[hi][2]
    while hi - lo > 1:  # points[lo].value <= x < points[hi].value
        mid = (lo + hi) // 2
        if points[mid][0] <= x:
            lo = mid
        else:
            hi = mid
    v0, _, p0 = points[lo]
    v1, p1, _ = points[hi]
    if x == v0:
        return points[lo][1] if left else p0
    return p0 + (p1 - p0) * (x - v0) / (v1 - v0)


def mixture_quantile(parts: Sequence[tuple[float, Sequence[tuple[float, float]]]], pct: float) -> float:
    """The ``pct`` percentile of a mixture of distributions, each given as ``(weight, grid)`` with
    ``grid`` as in ``Leg.latency_grid``: the smallest x at which the weighted mean of the parts' CDFs
    (each interpolated between its grid points) reaches ``pct``. With one part, a percentile on its
    grid gives that grid point's value exactly."""
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile out of range: {pct}")
    total = sum(w for w, grid in parts if w > 0 and grid)
    if total <= 0:
        raise ValueError("no part with a weight and a grid")
    cdfs = [(w / total, _cdf_points(grid)) for w, grid in parts if w > 0 and grid]
    xs = sorted({v for _, pts in cdfs for v, _, _ in pts})

    def cdf(x: float, left: bool = False) -> float:
        return sum(w * _cdf(pts, x, left=left) for w, pts in cdfs)

    eps = 1e-9
    before = None
    for x in xs:
        at = cdf(x)
        if at >= pct - eps:
            if before is None:
                return x
            prev_x, prev = before
            limit = cdf(x, left=True)
            if limit >= pct - eps and limit > prev:  # reached on the way up to x: interpolate
                return prev_x + (x - prev_x) * min(1.0, max(0.0, (pct - prev) / (limit - prev)))
            return x  # a step at x crosses pct
        before = (x, at)
    return xs[-1]


def combine_legs(legs: Sequence[Leg]) -> Row:
    """A target's row of one round from its legs: req/s = requests summed / wrk's seconds summed,
    errors summed, CPU = CPU-seconds summed / wall time summed, other CPU the legs' largest, p50 and
    p99 the percentiles of the legs' latency distributions merged (weighted by their requests); when
    a leg lacks the grid, the request-weighted mean of wrk's own percentiles. One leg gives that
    leg's figures."""
    if not legs:
        raise ValueError("no legs")
    first = legs[0]
    if any(leg.target != first.target or leg.reference != first.reference for leg in legs):
        raise ValueError(f"legs of different targets: {sorted({leg.target for leg in legs})}")
    requests = sum(leg.requests for leg in legs)
    seconds = sum(leg.seconds for leg in legs)
    elapsed = sum(leg.elapsed for leg in legs)
    cpus = [leg.cpu_seconds for leg in legs]
    others = [leg.other_cpu for leg in legs if leg.other_cpu is not None]
    weighted = [leg for leg in legs if leg.requests > 0]
    if weighted and all(leg.latency_grid for leg in weighted):
        parts = [(float(leg.requests), leg.latency_grid) for leg in weighted]
        p50, p99 = mixture_quantile(parts, 50), mixture_quantile(parts, 99)
    elif weighted:
        p50 = sum(leg.requests * leg.p50_ms for leg in weighted) / requests
        p99 = sum(leg.requests * leg.p99_ms for leg in weighted) / requests
    else:
        p50 = sum(leg.p50_ms for leg in legs) / len(legs)
        p99 = sum(leg.p99_ms for leg in legs) / len(legs)
    return Row(
        first.target, requests / seconds if seconds > 0 else 0.0, p50, p99, sum(leg.errors for leg in legs),
        requests, sum(c for c in cpus if c is not None) / elapsed if elapsed > 0 and None not in cpus else None,
        other_cpu=max(others) if others else None, reference=first.reference,
    )


def round_order(targets: Sequence[T], index: int) -> list[T]:
    """The order of round ``index`` (0-based): a different target first in every round, every other
    round reversed (a compared ref's twin runs right after its target in one round and right before
    it in the next)."""
    if not targets:
        return []
    order = list(targets) if index % 2 == 0 else list(targets)[::-1]
    shift = (index // 2) % len(order)
    return order[shift:] + order[:shift]


def serpentine(order: Sequence[T], legs: int) -> list[tuple[int, T]]:
    """``(leg, target)`` in the order a round runs them: leg 0 through ``order``, leg 1 back through
    it, leg 2 forward again, ... so that every target's legs spread evenly over the round (with an
    even number of legs each target's mean position is the same)."""
    if legs < 1:
        raise ValueError("legs must be ≥ 1")
    return [(leg, t) for leg in range(legs) for t in (order if leg % 2 == 0 else order[::-1])]


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of per-round values with their min and max."""

    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        present = [v for v in values if v is not None]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present))

    def cell(self, spec: str) -> str:
        """``median (min-max)``, or the median alone when every round gave the same value."""
        med = format(self.median, spec)
        lo, hi = format(self.lo, spec), format(self.hi, spec)
        return med if lo == hi else f"{med} ({lo}-{hi})"


@dataclass(frozen=True, slots=True)
class Summary:
    """One target over a set of rounds: medians with spreads, errors and requests summed."""

    target: str
    reference: str
    rounds: int
    rps: Spread
    p50_ms: float
    p99_ms: Spread
    errors: int
    requests: int
    cpu: float | None
    other_cpu: float | None  # the largest of the rounds'
    rps_ratio: Spread | None
    p99_ratio: Spread | None
    ceiling_ratio: Spread | None


def _ratio(a: float, b: float | None) -> float | None:
    return a / b if b else None


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """The rows of one round with req/s and p99 against their reference, and req/s against the byte
    relay, all from this same round (None where the round lacks the reference or the relay)."""
    by = {r.target: r for r in rows}
    ceiling = by.get(CEILING)
    out = []
    for r in rows:
        ref = by.get(r.reference)
        out.append(dataclasses.replace(
            r,
            rps_ratio=_ratio(r.rps, ref.rps) if ref else None,
            p99_ratio=_ratio(r.p99_ms, ref.p99_ms) if ref else None,
            ceiling_ratio=_ratio(r.rps, ceiling.rps) if ceiling else None,
        ))
    return out


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: Sequence[Sequence[Row]]) -> list[Summary]:
    """Per target (in the order of first appearance): medians of the figures and of the per-round
    ratios (not ratios of medians), with min-max."""
    names = list(dict.fromkeys(r.target for rnd in rounds for r in rnd))
    out = []
    for name in names:
        rs = [r for rnd in rounds for r in rnd if r.target == name]
        rps, p99 = Spread.of(r.rps for r in rs), Spread.of(r.p99_ms for r in rs)
        assert rps is not None and p99 is not None
        others = [r.other_cpu for r in rs if r.other_cpu is not None]
        out.append(Summary(
            target=name, reference=rs[0].reference, rounds=len(rs), rps=rps,
            p50_ms=_median(r.p50_ms for r in rs) or 0.0,
            p99_ms=p99, errors=sum(r.errors for r in rs), requests=sum(r.requests for r in rs),
            cpu=_median(r.cpu for r in rs), other_cpu=max(others) if others else None,
            rps_ratio=Spread.of(r.rps_ratio for r in rs), p99_ratio=Spread.of(r.p99_ratio for r in rs),
            ceiling_ratio=Spread.of(r.ceiling_ratio for r in rs),
        ))
    return out


def _find(rnd: Sequence[Row], name: str) -> Row | None:
    return next((r for r in rnd if r.target == name), None)


def per_core(row: Row | None) -> float | None:
    """req/s per core of the target's CPU: what a reference does with the CPU it got."""
    if row is None or not row.cpu or row.cpu <= 0:
        return None
    return row.rps / row.cpu


def _off_median(values: Sequence[float | None], tolerance: float) -> list[tuple[int, float, float]]:
    """``(index, value, median)`` of the values more than ``tolerance`` (a fraction) from their median."""
    med = _median(values)
    if med is None or med <= 0:
        return []
    return [(i, v, med) for i, v in enumerate(values) if v is not None and abs(v / med - 1) > tolerance]


def flag_rounds(
    rounds: Sequence[Sequence[Row]], *, tolerance: float = TOLERANCE, other_cpu_limit: float = OTHER_CPU_LIMIT,
) -> dict[int, list[str]]:
    """The flagged rounds (0-based index) with why. A round is flagged when a reference proxy's req/s
    per core (nginx-proxy; haproxy-insert) or the direct backend's ratio to nginx is more than
    ``tolerance`` away from the run's median of that figure, or when other work took more than
    ``other_cpu_limit`` cores during one of its measurements."""
    if not 0 < tolerance < 1 or other_cpu_limit < 0:
        raise ValueError("tolerance must be in (0, 1) and other_cpu_limit ≥ 0")
    flags: dict[int, list[str]] = {}
    for ref in (REFERENCE, NEW_SESSION_REFERENCE):
        values = [per_core(_find(rnd, ref)) for rnd in rounds]
        for i, v, med in _off_median(values, tolerance):
            flags.setdefault(i, []).append(
                f"{ref} {v:,.0f} req/s per core, {abs(v / med - 1):.0%} {'above' if v > med else 'below'} "
                f"the run's median {med:,.0f}")
    ratios = [r.rps_ratio if (r := _find(rnd, DIRECT)) and r.reference == REFERENCE else None for rnd in rounds]
    for i, v, med in _off_median(ratios, tolerance):
        flags.setdefault(i, []).append(
            f"{DIRECT} ÷ {REFERENCE} {v:.2f}, {abs(v / med - 1):.0%} {'above' if v > med else 'below'} "
            f"the run's median {med:.2f}")
    for i, rnd in enumerate(rounds):
        over = [r for r in rnd if r.other_cpu is not None and r.other_cpu > other_cpu_limit]
        if over:
            worst = max(over, key=lambda r: r.other_cpu or 0.0)
            flags.setdefault(i, []).append(
                f"other work above {other_cpu_limit:g} cores during {len(over)} of {len(rnd)} measurements "
                f"(up to {worst.other_cpu:.2f}, while {worst.target} ran)")
    return dict(sorted(flags.items()))


def unflagged(rounds: Sequence[Sequence[Row]], flags: Mapping[int, object]) -> list[Sequence[Row]]:
    return [rnd for i, rnd in enumerate(rounds) if i not in flags]


# --- tables ------------------------------------------------------------------------------------

_SHORT = {REFERENCE: "nginx", NEW_SESSION_REFERENCE: "haproxy"}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cell(s: Spread | None, spec: str) -> str:
    return "-" if s is None else s.cell(spec)


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---", *["---:"] * (len(header) - 2)]) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


ROUND_HEADER = ("target", "vs", "req/s", "p50 ms", "p99 ms", "errors", "target CPU", "other CPU", "req/s ÷ vs",
                "p99 ÷ vs", "req/s ÷ relay")


def round_table(rows: Sequence[Row]) -> str:
    """One round as a Markdown table (also readable as plain text); *vs* is the row's reference."""
    return _markdown(ROUND_HEADER, (
        (r.target, _SHORT.get(r.reference, r.reference), f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
         f"{r.errors:,}", _fmt(r.cpu, ".2f"), _fmt(r.other_cpu, ".2f"), _fmt(r.rps_ratio, ".2f"),
         _fmt(r.p99_ratio, ".2f"), _fmt(r.ceiling_ratio, ".2f"))
        for r in rows))


SUMMARY_HEADER = ("target", "vs", "req/s ÷ vs", "req/s ÷ relay", "req/s", "p99 ms", "p99 ÷ vs", "p50 ms", "errors",
                  "target CPU", "max other CPU")


def summary_table(summaries: Sequence[Summary]) -> str:
    """Medians with the per-round min-max in parentheses."""
    return _markdown(SUMMARY_HEADER, (
        (s.target, _SHORT.get(s.reference, s.reference), _cell(s.rps_ratio, ".2f"), _cell(s.ceiling_ratio, ".2f"),
         s.rps.cell(",.0f"), s.p99_ms.cell(".2f"), _cell(s.p99_ratio, ".2f"), f"{s.p50_ms:.2f}", f"{s.errors:,}",
         _fmt(s.cpu, ".2f"), _fmt(s.other_cpu, ".2f"))
        for s in summaries))


def reference_table(rounds: Sequence[Sequence[Row]], flags: Mapping[int, object]) -> str:
    """What the flagging looked at, round by round."""
    def fig(rnd: Sequence[Row], name: str) -> str:
        return _fmt(per_core(_find(rnd, name)), ",.0f")

    def direct(rnd: Sequence[Row]) -> str:
        return _fmt(r.rps_ratio if (r := _find(rnd, DIRECT)) else None, ".2f")

    def other(rnd: Sequence[Row]) -> str:
        return _fmt(max((r.other_cpu for r in rnd if r.other_cpu is not None), default=None), ".2f")

    header = ("round", "flagged", f"{REFERENCE} req/s per core", f"{NEW_SESSION_REFERENCE} req/s per core",
              f"{DIRECT} ÷ {REFERENCE}", "max other CPU")
    return _markdown(header, (
        (str(i + 1), "yes" if i in flags else "no", fig(rnd, REFERENCE), fig(rnd, NEW_SESSION_REFERENCE), direct(rnd),
         other(rnd))
        for i, rnd in enumerate(rounds)))


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def verdicts(summaries: Sequence[Summary]) -> list[str]:
    """Issue #16's "done when" checks on medians of same-round ratios (aiohttp engine: for information)."""
    by = {s.target: s for s in summaries}
    out = []
    if (p := by.get("affinity-proxy")) and p.rps_ratio and p.p99_ratio:
        ok = p.rps_ratio.median >= 0.70 and p.p99_ratio.median <= 1.5 and p.errors == 0
        out.append(f"- proxy mode: {p.rps_ratio.cell('.2f')} x nginx-proxy req/s (target ≥ 0.70), p99 "
                   f"{p.p99_ratio.cell('.2f')} x nginx's (target ≤ 1.5), {p.errors} errors (target 0): {_met(ok)}")
    if (f := by.get("affinity-fly")) and f.rps_ratio:
        ok = f.rps_ratio.median >= 2.0 and f.errors == 0
        out.append(f"- fly-mode replay answers: {f.rps_ratio.cell('.2f')} x nginx-proxy req/s (target ≥ 2.0), "
                   f"{f.errors} errors (target 0): {_met(ok)}")
    if (n := by.get("affinity-new")) and n.rps_ratio:
        ok = n.rps_ratio.median >= 0.5 and n.errors == 0
        out.append(f"- new sessions (no cookie, one minted): {n.rps_ratio.cell('.2f')} x HAProxy `cookie insert` "
                   f"req/s (target ≥ 0.5), {n.errors} errors (target 0): {_met(ok)}")
    for name, what in (("affinity-proxy", "proxy mode"), ("affinity-new", "new sessions")):
        if (s := by.get(name)) and s.ceiling_ratio:
            out.append(f"- {what} against the Python byte-relay ceiling: {s.ceiling_ratio.cell('.2f')}")
    for name, what in (("affinity-aiohttp", "proxy mode, aiohttp engine"),
                       ("affinity-fly-aiohttp", "fly replays, aiohttp engine"),
                       ("naive-aiohttp", "naive aiohttp proxy"), (CEILING, "byte relay (ceiling)")):
        if (s := by.get(name)) and s.rps_ratio:
            out.append(f"- {what}: {s.rps_ratio.cell('.2f')} x nginx-proxy req/s (for information)")
    return out


# --- against an earlier commit (--compare-ref) -------------------------------------------------

#: Issue #13: after the redesign the benchmark ratio stays within 5 % of the figure before it.
REF_TOLERANCE = 0.05


def ref_pairs(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(target, its twin at a ref, the ref's label)`` for every ``target@label`` in ``names`` whose
    ``target`` is there too, in the order of ``names``."""
    present = list(dict.fromkeys(names))
    out = []
    for name in present:
        base, sep, label = name.partition("@")
        if sep and label and base in present:
            out.append((base, name, label))
    return out


def same_round_ratio(rounds: Sequence[Sequence[Row]], name: str, other: str) -> Spread | None:
    """req/s of ``name`` over req/s of ``other`` in each round where both ran (and ``other`` served
    something), as the median with min-max; None when no round has both."""
    values = []
    for rnd in rounds:
        a, b = _find(rnd, name), _find(rnd, other)
        if a is not None and b is not None and b.rps > 0:
            values.append(a.rps / b.rps)
    return Spread.of(values)


def comparison_lines(rounds: Sequence[Sequence[Row]], *, tolerance: float = REF_TOLERANCE) -> list[str]:
    """One line per target measured beside its twin at a ref: ``current / REF same-round ratio:
    median (min-max)`` of req/s (and of p99), with issue #13's check that the current code keeps at
    least ``1 - tolerance`` of the ref's req/s. Errors of either side are named: a ratio over a run
    with errors is not a like-for-like figure."""
    names = [r.target for rnd in rounds for r in rnd]
    out = []
    for base, twin, label in ref_pairs(names):
        rps = same_round_ratio(rounds, base, twin)
        if rps is None:
            continue
        p99s = [a.p99_ms / b.p99_ms for rnd in rounds
                if (a := _find(rnd, base)) and (b := _find(rnd, twin)) and b.p99_ms > 0]
        p99 = Spread.of(p99s)
        errors = {n: sum(r.errors for rnd in rounds for r in rnd if r.target == n) for n in (base, twin)}
        ok = rps.median >= 1 - tolerance and not any(errors.values())
        line = (f"- {base}: current / {label} same-round ratio: {rps.cell('.3f')} req/s"
                + (f", p99 {p99.cell('.2f')}" if p99 else "")
                + f"; within {tolerance:.0%} of {label} (median ≥ {1 - tolerance:.2f}, 0 errors): {_met(ok)}")
        if any(errors.values()):
            line += f" ({errors[base]} errors current, {errors[twin]} at {label})"
        out.append(line)
    return out
