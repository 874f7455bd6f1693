"""benchmarks/PLACEMENT.md from one run of benchmarks/placement_sim.py (kept apart so the sim stays short)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.placement_sim import SimConfig, Simulation

LABELS = {
    "ketama": "plain ketama (affinity-proxy today, NGINX `hash ... consistent`)",
    "inflight": "in-flight-bounded (HAProxy/Envoy `hash_balance_factor` 1.25 on in-flight requests)",
    "ours": "ours: bounded live sessions (`load_factor` 1.25) + idle rebalance",
}
KINDS = ("rebalance_idle", "rebalance_active", "forced_idle", "forced_active")


def render(cfg: SimConfig, sim: Simulation, stats: dict[str, dict[str, float]], elapsed: float, plot: str) -> str:
    """The report: set-up, max/mean per strategy, moves per event window, and how to reproduce."""
    lines = [
        "# Placement simulation (issue #14)",
        "",
        "Written by `make bench-placement` (`python -m benchmarks.placement_sim`); pure and seeded, every",
        "placement made by the real `affinity_proxy.routing` code. Do not edit by hand.",
        "",
        f"- {sim.arrived:,} users arriving as a Poisson process over {cfg.horizon / 3600:.0f} simulated hours;"
        f" {cfg.instances} instances (every fourth has weight 2).",
        "- A session is an active phase (lognormal, median 5 min, sigma 1.0) then an idle tail during which its"
        " pin still holds state on the instance (lognormal, median 30 min, sigma 1.5). All strategies pin"
        " sessions; they differ in where a new session goes and in whether idle pins move.",
        f"- Events at hours {', '.join(f'{at / 3600:.0f} ({kind})' for at, kind in cfg.events)}: scale up by"
        f" {max(1, cfg.instances // 5)}, kill {max(1, cfg.instances // 10)}, drain {max(1, cfg.instances // 10)},"
        " blue/green all (every up instance drains, a copy with the same weight comes up).",
        f"- In-flight model: requests in flight on an instance ~ Poisson({cfg.concurrency} x its active sessions),"
        " snapshot each simulated second.",
        f"- Ours: `place()` on exact live-session counts, `plan_rebalance()` every {cfg.tick:.0f} s with"
        f" `idle_after` {cfg.idle_after:.0f} s and a budget of {cfg.budget:,} moves per minute.",
        f"- max/mean = max over up instances of sessions/weight, over the mean per unit weight; sampled every"
        f" {cfg.tick:.0f} s after the rebalance pass; samples with fewer than {cfg.min_mean:.0f} sessions per"
        " unit weight on the up instances (warm-up, the first minutes after blue/green) are not counted.",
        f"- Run time: {elapsed:.0f} s.",
        "",
        f"![max/mean over time]({plot})",
        "",
        "## max/mean live sessions per unit weight",
        "",
        "| strategy | median | p99 | max | samples | at the event, before any rebalance pass (max) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in stats.items():
        peaks = sim.strategies[name].event_peak
        at_event = max(peaks.values()) if peaks else float("nan")
        lines.append(
            f"| {LABELS[name]} | {row['median']:.3f} | {row['p99']:.3f} | {row['max']:.3f} |"
            f" {row['samples']:.0f} | {at_event:.3f} |"
        )
    lines += [
        "",
        "## Users moved per event window (from the event to the next one)",
        "",
        "`rebalance_*`: moved by the strategy (only ours moves anyone); `forced_*`: their instance died, so every"
        " strategy must re-pin them. `*_active`: the user had made a request within `idle_after`.",
        "",
        "| strategy | window | " + " | ".join(KINDS) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for name, s in sim.strategies.items():
        for window in ("steady", *(kind for _, kind in cfg.events)):
            counts = s.moves.get(window, {})
            lines.append(f"| {name} | {window} | " + " | ".join(f"{counts.get(k, 0):,}" for k in KINDS) + " |")
    lines += [
        "",
        "## Reading it",
        "",
        "- The in-flight bound sees requests, not sessions: idle sessions cost the app memory but send nothing,"
        " so it balances the active minority; live sessions follow only loosely, and nothing moves after a"
        " scale-up or blue/green, so its peaks after events stay above the load factor until sessions end.",
        "- After scale-up and blue/green only ours moves load onto the new instances before sessions end; it"
        " moves idle users only (`rebalance_active` must be 0).",
        "- The column 'at the event' is the instant the membership changes, before the first rebalance pass: no"
        " placement policy can fix existing pins instantly; ours fixes them within the move budget.",
        "- Not modelled: the live-session snapshot's staleness (counts here are exact), anonymous sessions that"
        " can only move at their next request, HAProxy/Envoy without stickiness re-hashing each request.",
        "",
    ]
    return "\n".join(lines)
