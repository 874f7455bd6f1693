"""Placement at scale (issue #14): plain ketama vs in-flight-bounded hashing vs bounded live sessions.

Pure and seeded: no network, no clocks; every placement goes through the real ``affinity_proxy.routing``
code (``MembershipView.choose_new``, ``placement.place``, ``rebalance.plan_rebalance``). Users arrive
as a Poisson process over the horizon; each session is an active phase (lognormal, median 5 min) and
then an idle tail during which the pin still holds state on its instance (lognormal, median 30 min,
heavy tail). Events: scale up by a fifth, kill a tenth, drain a tenth, blue/green all. Every strategy
pins sessions (cookie or stored pin); they differ only in where a new session goes and whether idle
pins move. ``python -m benchmarks.placement_sim`` writes benchmarks/PLACEMENT.md and placement.png.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView
from affinity_proxy.routing.placement import place
from affinity_proxy.routing.rebalance import plan_rebalance
from benchmarks.placement_report import render

HOUR = 3600.0
STRATEGIES = ("ketama", "inflight", "ours")
HERE = Path(__file__).parent


@dataclass(frozen=True)
class SimConfig:
    users: int = 1_000_000
    instances: int = 50
    seed: int = 1
    load_factor: float = 1.25
    idle_after: float = 600.0
    moves_per_minute: int | None = None  # default: users / 100 (1% of arrivals, ~5% of live sessions)
    horizon: float = 8 * HOUR
    tick: float = 60.0  # rebalance pass and sample every tick
    concurrency: float = 0.05  # in-flight requests per active session (1 request / 2 s x 100 ms)
    min_mean: float = 20.0  # samples with fewer sessions per unit weight are not counted (rounding)
    events: tuple[tuple[float, str], ...] = ((3 * HOUR, "scale_up"), (4 * HOUR, "kill"), (5 * HOUR, "drain"),
                                             (6 * HOUR, "bluegreen"))  # fmt: skip

    @property
    def budget(self) -> int:
        return self.moves_per_minute if self.moves_per_minute is not None else max(10, self.users // 100)


@dataclass
class Strategy:
    """One strategy's world: where each user is pinned, counts per instance, moves made."""

    name: str
    where: dict[int, str] = field(default_factory=dict)
    members: dict[str, dict[int, None]] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, float | None]] = field(default_factory=list)
    moves: dict[str, dict[str, int]] = field(default_factory=dict)
    event_peak: dict[str, float] = field(default_factory=dict)

    def loads(self) -> dict[str, int]:
        return {n: len(m) for n, m in self.members.items()}

    def pin(self, uid: int, node: str, is_active: bool) -> None:
        self.where[uid] = node
        self.members.setdefault(node, {})[uid] = None
        if is_active:
            self.active[node] = self.active.get(node, 0) + 1

    def unpin(self, uid: int, is_active: bool) -> str:
        node = self.where.pop(uid)
        del self.members[node][uid]
        if is_active:
            self.active[node] -= 1
        return node

    def count(self, window: str, kind: str) -> None:
        bucket = self.moves.setdefault(window, {})
        bucket[kind] = bucket.get(kind, 0) + 1


class _IdlePins(Mapping[str, Iterator[tuple[str, float]]]):
    """The planner's view of the pins: built lazily, only for the instances it reads."""

    def __init__(self, members: dict[str, dict[int, None]], active_end: list[float], now: float) -> None:
        self._members, self._end, self._now = members, active_end, now

    def __getitem__(self, node: str) -> Iterator[tuple[str, float]]:
        if node not in self._members:
            raise KeyError(node)
        end, now = self._end, self._now
        return ((f"u{uid}", min(end[uid], now)) for uid in list(self._members[node]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)


def ratio(view: MembershipView, loads: Mapping[str, int], min_mean: float = 0.0) -> float | None:
    """max over up instances of (sessions / weight) divided by their mean per unit weight."""
    ups = [i for i in view.instances if i.state is InstanceState.UP]
    total, weight = sum(loads.get(i.id, 0) for i in ups), sum(i.weight for i in ups)
    if not ups or total == 0 or total / weight < min_mean:
        return None
    return max(loads.get(i.id, 0) / i.weight for i in ups) / (total / weight)


def _poisson(rng: random.Random, mu: float) -> int:
    if mu < 30:
        limit, k, p = math.exp(-mu), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        return k
    return max(0, round(rng.gauss(mu, math.sqrt(mu))))


class Simulation:
    """All three strategies in lockstep over one stream of users, so they see identical traffic."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.noise = random.Random(cfg.seed + 1)
        insts = [Instance(InstanceId(f"m{n:03d}"), weight=2 if n % 4 == 0 else 1) for n in range(cfg.instances)]
        self.view = MembershipView.build(insts)
        self.strategies = {name: Strategy(name) for name in STRATEGIES}
        self.active_end: list[float] = [0.0] * cfg.users
        self.window = "steady"
        self.arrived = 0

    def _place(self, s: Strategy, uid: int, exclude: frozenset[str] = frozenset()) -> str:
        key = f"u{uid}"
        if s.name == "ketama":
            found = self.view.choose_new(key, exclude)
        else:
            loads = s.inflight if s.name == "inflight" else s.loads()
            chosen = place(self.view, key, loads, self.cfg.load_factor, exclude)
            found = chosen.instance if chosen else None
        if found is None:
            raise RuntimeError("no instance can take a new session")
        if s.name == "inflight":
            s.inflight[found] = s.inflight.get(found, 0) + 1
        return found

    def _refresh_inflight(self) -> None:
        s = self.strategies["inflight"]
        s.inflight = {i.id: _poisson(self.noise, self.cfg.concurrency * s.active.get(i.id, 0))
                      for i in self.view.instances}  # fmt: skip

    def _event(self, kind: str, now: float) -> None:
        cfg, insts = self.cfg, list(self.view.instances)
        up = [i for i in insts if i.state is InstanceState.UP]
        self.window = kind
        if kind == "scale_up":
            insts += [Instance(InstanceId(f"s{n:03d}"), weight=1) for n in range(max(1, cfg.instances // 5))]
        elif kind in ("kill", "drain"):
            pick = {i.id for i in self.rng.sample(up, max(1, cfg.instances // 10))}
            new_state = InstanceState.GONE if kind == "kill" else InstanceState.DRAINING
            insts = [Instance(i.id, weight=i.weight, state=new_state) if i.id in pick else i for i in insts]
        elif kind == "bluegreen":
            green = [Instance(InstanceId(f"g{i.id}"), weight=i.weight) for i in up]
            insts = [Instance(i.id, weight=i.weight, state=InstanceState.DRAINING) if i in up else i for i in insts]
            insts += green
        self.view = MembershipView.build(insts, self.view.epoch + 1)
        gone = {i.id for i in insts if i.state is InstanceState.GONE}
        for s in self.strategies.values():
            for node in gone & set(s.members):
                for uid in list(s.members[node]):  # their next request re-pins them (forced, every strategy)
                    is_active = self.active_end[uid] > now
                    s.unpin(uid, is_active)
                    s.pin(uid, self._place(s, uid), is_active)
                    s.count(kind, "forced_active" if is_active else "forced_idle")
                del s.members[node]
            s.event_peak[kind] = ratio(self.view, s.loads()) or 0.0

    def _rebalance(self, now: float) -> None:
        s = self.strategies["ours"]
        pins = _IdlePins(s.members, self.active_end, now)
        for move in plan_rebalance(self.view, pins, s.loads(), now, self.cfg.idle_after, self.cfg.budget):
            uid = int(move.user_key[1:])
            is_active = self.active_end[uid] > now or now - self.active_end[uid] < self.cfg.idle_after
            s.unpin(uid, self.active_end[uid] > now)
            s.pin(uid, move.target, self.active_end[uid] > now)
            s.count(self.window, "rebalance_active" if is_active else "rebalance_idle")

    def run(self) -> dict[str, Strategy]:
        cfg, rng = self.cfg, self.rng
        rate = cfg.users / cfg.horizon
        ends: list[tuple[float, int, int]] = []  # (time, 0 = active phase ends / 1 = session ends, uid)
        events = list(cfg.events)
        next_tick, next_refresh, t, uid = cfg.tick, 1.0, 0.0, 0
        t += rng.expovariate(rate)
        while t < cfg.horizon or uid < cfg.users:
            arrival = t if uid < cfg.users else math.inf
            now = min(arrival, ends[0][0] if ends else math.inf, next_tick, next_refresh, cfg.horizon)
            if now >= cfg.horizon:
                break
            if now == next_refresh:
                self._refresh_inflight()
                next_refresh += 1.0
            elif now == next_tick:
                while events and events[0][0] <= now:
                    self._event(events.pop(0)[1], now)
                self._rebalance(now)
                for s in self.strategies.values():
                    s.samples.append((now, ratio(self.view, s.loads(), cfg.min_mean)))
                next_tick += cfg.tick
            elif ends and ends[0][0] == now:
                _, kind, who = heapq.heappop(ends)
                for s in self.strategies.values():
                    if kind == 0:
                        s.active[s.where[who]] -= 1
                    else:
                        s.unpin(who, False)
            else:
                active_len = rng.lognormvariate(math.log(300.0), 1.0)
                idle_len = rng.lognormvariate(math.log(1800.0), 1.5)
                self.active_end[uid] = now + active_len
                heapq.heappush(ends, (now + active_len, 0, uid))
                heapq.heappush(ends, (now + active_len + idle_len, 1, uid))
                for s in self.strategies.values():
                    s.pin(uid, self._place(s, uid), True)
                uid += 1
                t += rng.expovariate(rate)
        self.arrived = uid
        return self.strategies


def summarize(cfg: SimConfig, strategies: dict[str, Strategy]) -> dict[str, dict[str, float]]:
    """Per strategy: median, p99 and max of max/mean over the counted samples (mean >= min_mean)."""
    del cfg
    out: dict[str, dict[str, float]] = {}
    for name, s in strategies.items():
        counted = sorted(r for _, r in s.samples if r is not None)
        out[name] = {
            "median": counted[len(counted) // 2] if counted else math.nan,
            "p99": counted[min(len(counted) - 1, int(len(counted) * 0.99))] if counted else math.nan,
            "max": counted[-1] if counted else math.nan,
            "samples": float(len(counted)),
        }
    return out


def write_plot(strategies: dict[str, Strategy], cfg: SimConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    for name, s in strategies.items():
        xs = [t / HOUR for t, r in s.samples if r is not None]
        ys = [min(r, 3.0) for _, r in s.samples if r is not None]
        ax.plot(xs, ys, label=name, linewidth=1.2)
    ax.axhline(cfg.load_factor, color="grey", linestyle="--", linewidth=0.8, label=f"load_factor {cfg.load_factor}")
    for at, kind in cfg.events:
        ax.axvline(at / HOUR, color="black", linestyle=":", linewidth=0.8)
        ax.text(at / HOUR + 0.03, 2.85, kind, fontsize=8)
    ax.set_ylim(0.9, 3.0)
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("max / mean live sessions per unit weight (up instances; clipped at 3)")
    ax.set_title(f"{cfg.users:,} users, {cfg.instances} weighted instances, seed {cfg.seed}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=SimConfig.users)
    parser.add_argument("--instances", type=int, default=SimConfig.instances)
    parser.add_argument("--seed", type=int, default=SimConfig.seed)
    parser.add_argument("--moves-per-minute", type=int, default=None)
    parser.add_argument("--output", type=Path, default=HERE / "PLACEMENT.md")
    parser.add_argument("--plot", type=Path, default=HERE / "placement.png")
    args = parser.parse_args(argv)
    cfg = SimConfig(users=args.users, instances=args.instances, seed=args.seed, moves_per_minute=args.moves_per_minute)
    started = time.perf_counter()
    sim = Simulation(cfg)
    strategies = sim.run()
    elapsed = time.perf_counter() - started
    write_plot(strategies, cfg, args.plot)
    args.output.write_text(render(cfg, sim, summarize(cfg, strategies), elapsed, args.plot.name))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
