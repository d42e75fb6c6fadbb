"""Background loops: started once, stopped by cancelling, and not killed by one failing step."""

import asyncio

import pytest

from driftlock_kernel.background import BackgroundTask, every
from tests.support.net import eventually


async def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog):
    steps: list[int] = []

    async def step() -> None:
        steps.append(len(steps))
        if len(steps) == 2:
            raise RuntimeError("one bad batch")

    loop = every(0.001, step, name="test-loop")
    loop.start()
    try:

        async def ran_past_the_failure() -> bool:
            return len(steps) >= 4

        await eventually(ran_past_the_failure, within=5, what="steps after the failing one")
    finally:
        await loop.stop()
    assert not loop.running
    assert "test-loop: a step failed" in caplog.text


async def test_stop_cancels_and_a_task_starts_only_once():
    started = asyncio.Event()

    async def run() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = BackgroundTask("sleeper", run)
    await task.stop()  # stopping what never started is harmless
    task.start()
    with pytest.raises(RuntimeError):
        task.start()
    await asyncio.wait_for(started.wait(), 5)
    assert task.running
    await task.stop()
    assert not task.running
