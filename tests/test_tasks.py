"""TaskSet.close(): a background task whose cancellation was swallowed still ends (a worker once
hung at shutdown on a refresh loop whose Redis call returned normally after its cancel)."""

from __future__ import annotations

import asyncio

import pytest

from affinity_proxy._tasks import TaskSet


async def test_close_cancels_again_a_task_that_swallowed_its_cancel(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet()
    swallowed = asyncio.Event()
    rounds = 0

    async def stubborn_loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # what the library under the real loop did
                if swallowed.is_set():
                    raise
                swallowed.set()

    tasks.spawn(stubborn_loop(), name="stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.close(), timeout=30)
    assert swallowed.is_set() and rounds == 2 and len(tasks) == 0
    assert "stubborn survived its cancellation" in caplog.text


async def test_close_waits_for_well_behaved_tasks_and_keeps_crash_logging(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet()
    cleaned = asyncio.Event()

    async def polite() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    async def crashing() -> None:
        raise RuntimeError("boom")

    tasks.spawn(polite(), name="polite")
    crashed = tasks.spawn(crashing(), name="crashing")
    await asyncio.wait({crashed})
    await tasks.close()
    assert cleaned.is_set() and tasks.crashes == 1 and len(tasks) == 0
    assert "background task crashing crashed" in caplog.text and "survived" not in caplog.text
