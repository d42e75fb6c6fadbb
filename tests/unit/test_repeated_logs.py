"""Floods of one kind of event become two log lines per interval, whatever their rate."""

import asyncio
import logging

import pytest

from driftlock_kernel.repeated_logs import MAX_KINDS, RepeatedLog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged(caplog):
    caplog.set_level(logging.INFO, logger="tests.repeated")
    return lambda: [record.getMessage() for record in caplog.records if record.name == "tests.repeated"]


def make(clock, interval: float = 60.0) -> RepeatedLog:
    return RepeatedLog(logging.getLogger("tests.repeated"), interval=interval, clock=clock)


def test_ten_thousand_events_of_one_kind_are_two_lines(logged):
    clock = Clock()
    repeated = make(clock)
    for n in range(10_000):
        clock.now = n * 0.001  # ten seconds' worth at 1,000 a second
        repeated.warning("mismatch", "refused a delivery: signature %s", "mismatch")
    clock.now = 61.0
    repeated.flush()
    assert logged() == [
        "refused a delivery: signature mismatch",
        "refused a delivery: signature mismatch (and 9999 more like it in the last 60 s)",
    ]


def test_each_kind_gets_its_first_line_at_once(logged):
    repeated = make(Clock())
    repeated.info("missing", "signature %s", "missing")
    repeated.info("expired", "signature %s", "expired")
    repeated.info("missing", "signature %s", "missing")
    assert logged() == ["signature missing", "signature expired"]


def test_after_the_interval_the_next_event_is_logged_at_once_again(logged):
    clock = Clock()
    repeated = make(clock)
    repeated.warning("down", "look-up failed: %s", "first")
    clock.now = 30.0
    repeated.warning("down", "look-up failed: %s", "second")
    clock.now = 61.0
    repeated.warning("down", "look-up failed: %s", "third")
    assert logged() == [
        "look-up failed: first",
        "look-up failed: second (and 1 more like it in the last 60 s)",
        "look-up failed: third",
    ]


def test_a_single_event_has_no_summary(logged):
    clock = Clock()
    repeated = make(clock)
    repeated.warning("down", "once")
    clock.now = 120.0
    repeated.flush()
    assert logged() == ["once"]


def test_kinds_past_the_bound_share_one(logged):
    repeated = make(Clock())
    for n in range(MAX_KINDS + 50):
        repeated.info(n, "event %d", n)
    assert len(logged()) == MAX_KINDS + 1  # the first of each kind held, then one line for all the others


async def test_the_summary_is_written_when_the_interval_ends_without_another_event(logged):
    repeated = RepeatedLog(logging.getLogger("tests.repeated"), interval=0.05)
    repeated.warning("down", "look-up failed")
    repeated.warning("down", "look-up failed")

    async def summarised() -> bool:
        return len(logged()) == 2

    for _ in range(200):
        if await summarised():
            break
        await asyncio.sleep(0.01)
    assert logged() == ["look-up failed", "look-up failed (and 1 more like it in the last 0.05 s)"]


def test_nothing_is_counted_below_the_loggers_level(caplog):
    caplog.set_level(logging.WARNING, logger="tests.repeated")
    repeated = make(Clock())
    repeated.info("quiet", "not shown")
    repeated.flush()
    assert [r for r in caplog.records if r.name == "tests.repeated"] == []
