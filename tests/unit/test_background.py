"""Background loops: started once, stopped by cancelling, and not killed by one failing step."""

import asyncio
import contextlib

import pytest

from driftlock_kernel.background import BackgroundTask, every, wait_set
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


async def test_stop_ends_a_loop_whose_wait_for_swallowed_the_cancellation():
    """Python 3.11's asyncio.wait_for returns the result when the cancellation meets it (gh-86296): the loop goes
    on as if never asked to stop. stop() repeats the request until the task has ended."""
    woken = asyncio.Event()
    rounds: list[int] = []

    async def loop() -> None:
        while True:
            rounds.append(len(rounds))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), 30)
            woken.clear()

    task = BackgroundTask("swallows-a-cancel", loop)
    task.start()
    await asyncio.sleep(0)  # the loop is waiting
    woken.set()  # the wait ends in the same turn of the event loop as stop()'s cancellation
    stopping = asyncio.create_task(task.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)  # (not wait_for: its own cancel would end the loop)
    try:
        assert stopping in done, "stop() still waiting for a loop that swallowed its cancellation"
        assert not task.running
    finally:
        stopping.cancel()


async def test_wait_set_never_loses_a_cancellation_that_meets_the_event():
    woken = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait_set(woken, 30)
            woken.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    woken.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done and task.cancelled()


async def test_wait_set_says_whether_the_event_was_set():
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 30) is True
