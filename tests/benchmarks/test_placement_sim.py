"""The placement simulation at small scale (issue #14): ours stays within load_factor and moves no active user."""

from __future__ import annotations

from benchmarks.placement_sim import STRATEGIES, SimConfig, Simulation, summarize


def test_small_simulation_keeps_ours_bounded_and_moves_no_active_user() -> None:
    cfg = SimConfig(users=5_000, instances=10, seed=7)
    sim = Simulation(cfg)
    strategies = sim.run()
    assert set(strategies) == set(STRATEGIES)
    ours = strategies["ours"]
    counted = [r for _, r in ours.samples if r is not None]
    assert len(counted) > 300  # most of the 8 simulated hours are counted
    assert max(counted) <= cfg.load_factor, [(t, r) for t, r in ours.samples if r and r > cfg.load_factor]
    assert all(window.get("rebalance_active", 0) == 0 for window in ours.moves.values())
    assert sum(window.get("rebalance_idle", 0) for window in ours.moves.values()) > 0
    for name in ("ketama", "inflight"):  # only ours moves anyone; kills force re-pins everywhere
        assert all(set(w) <= {"forced_idle", "forced_active"} for w in strategies[name].moves.values())
    stats = summarize(cfg, strategies)
    assert stats["ours"]["max"] <= stats["ketama"]["max"]
