"""CircuitBreaker bookkeeping with a fake clock: windows, probes, transitions."""

from __future__ import annotations

import random

from affinity_proxy.pins.redis_breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(jitter: float = 0.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(base=0.1, cap=5.0, jitter=jitter, clock=clock, rng=random.Random(7)), clock


def test_closed_admits_everything() -> None:
    breaker, _ = make()
    assert breaker.admit() == 0
    assert breaker.succeeded(0) is False
    assert breaker.available


def test_failure_opens_once_and_fails_fast_until_the_window_ends() -> None:
    breaker, clock = make()
    assert breaker.failed(0) is True
    assert breaker.failed(0) is False  # a second in-flight call failing is not a new transition
    assert not breaker.available
    assert breaker.admit() is None
    clock.now += 0.099
    assert breaker.admit() is None
    clock.now += 0.002
    assert breaker.admit() == 1  # the probe
    assert breaker.admit() is None  # only one probe at a time
    assert breaker.succeeded(1) is True
    assert breaker.available and breaker.admit() == 0


def test_window_doubles_per_failed_probe_up_to_the_cap() -> None:
    breaker, clock = make()
    breaker.failed(0)
    windows = [breaker.window]
    for _ in range(9):
        clock.now += breaker.window
        token = breaker.admit()
        assert token == 1
        assert breaker.failed(token) is False
        windows.append(breaker.window)
    assert windows == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]


def test_late_failures_do_not_lengthen_the_window() -> None:
    breaker, _ = make()
    breaker.failed(0)
    breaker.failed(0)
    breaker.failed(0)
    assert breaker.window == 0.1


def test_jitter_only_shortens() -> None:
    breaker, clock = make(jitter=0.2)
    breaker.failed(0)
    windows = [breaker.window]
    for _ in range(30):
        clock.now += breaker.window
        token = breaker.admit()
        assert token == 1
        breaker.failed(token)
        windows.append(breaker.window)
    assert 0.08 <= windows[0] <= 0.1
    assert all(w <= 5.0 for w in windows)
    assert all(4.0 <= w for w in windows[-20:])
    assert len(set(windows)) > 10  # actually jittered


def test_forced_call_bypasses_and_can_close() -> None:
    breaker, _ = make()
    breaker.failed(0)
    assert breaker.admit(force=True) == 0
    assert breaker.succeeded(0) is True
    assert breaker.available


def test_abandoned_probe_frees_the_slot() -> None:
    breaker, clock = make()
    breaker.failed(0)
    clock.now += 1
    assert breaker.admit() == 1
    breaker.abandon(1)
    assert breaker.admit() == 1
