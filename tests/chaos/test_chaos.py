"""Chaos under load (issue #7 item 3): each fault injected while HTTP and WebSocket traffic runs.

The short versions run in the normal suite (a few seconds of traffic each); the long versions are
``@pytest.mark.slow`` and also ``python -m tests.chaos --long`` (which writes tests/chaos/RESULTS.md).
Run with ``-s`` to see the per-fault table.
"""

from __future__ import annotations

import pytest

from tests.chaos.harness import FAULTS, LONG, SHORT, FaultReport, run_fault


def check(report: FaultReport) -> None:
    assert report.sent > 100, report.details()
    assert report.failed_live == 0, report.details()
    assert report.repinned_live == 0, report.details()
    assert not report.violations, report.details()
    for kind, counts in report.by_class.items():
        assert counts["sent"] > counts["failed"], f"{kind} never succeeded: {report.details()}"
    if report.fault in ("kill", "hang", "flap"):
        assert report.affected > 0, "some clients were pinned to the faulted instance"
        assert report.recover is not None and report.recover != float("inf"), report.details()
    if report.fault in ("redis", "flap"):
        assert report.failed == 0, report.details()


@pytest.mark.parametrize("fault", FAULTS)
async def test_chaos_short(fault: str) -> None:
    check(await run_fault(fault, SHORT))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", FAULTS)
async def test_chaos_long(fault: str) -> None:
    check(await run_fault(fault, LONG))
