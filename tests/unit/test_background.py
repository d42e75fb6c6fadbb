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


async def test_drain_lets_the_step_in_flight_finish_and_the_loop_end_by_itself():
    in_step, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def run() -> None:
        while not task.stopping.is_set():
            in_step.set()
            await release.wait()  # a call to another service, in flight when the drain begins
            finished.append("step")
            await task.pause(3600)  # cut short by drain()

    task = BackgroundTask("exporter-like", run)
    assert await task.drain(1) is True  # never started: nothing to wait for
    task = BackgroundTask("exporter-like", run)
    task.start()
    await asyncio.wait_for(in_step.wait(), 5)
    draining = asyncio.ensure_future(task.drain(30))
    await asyncio.sleep(0)
    assert task.stopping.is_set() and not draining.done()
    release.set()
    assert await asyncio.wait_for(draining, 5) is True
    assert finished == ["step"] and not task.running


async def test_drain_cancels_a_step_that_outlasts_the_grace():
    async def run() -> None:
        await asyncio.sleep(3600)  # a step that never ends

    task = BackgroundTask("stuck", run)
    task.start()
    await asyncio.sleep(0)
    assert await task.drain(0.05) is False
    assert not task.running
