from datetime import UTC, datetime, timedelta

from driftlock_kernel.periods import Period, calendar_month, current_period


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_calendar_month_covers_the_utc_month():
    assert calendar_month(at(2026, 11, 26, 7)) == Period(at(2026, 11, 1), at(2026, 12, 1))


def test_calendar_month_rolls_over_the_year():
    assert calendar_month(at(2026, 12, 31, 23, 59, 59)) == Period(at(2026, 12, 1), at(2027, 1, 1))


def test_calendar_month_uses_utc_not_local_time():
    moment = datetime(2026, 12, 1, 0, 30, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("America/New_York"))
    assert calendar_month(moment).start == at(2026, 12, 1)


def test_subscription_period_is_used_when_current():
    period = current_period(at(2026, 11, 15), at(2026, 12, 15), at(2026, 11, 26))
    assert period == Period(at(2026, 11, 15), at(2026, 12, 15))


def test_no_subscription_means_calendar_month():
    assert current_period(None, None, at(2026, 11, 26)) == calendar_month(at(2026, 11, 26))


def test_ended_subscription_period_rolls_forward_from_its_end():
    start, end = at(2026, 10, 15), at(2026, 11, 15)
    period = current_period(start, end, at(2026, 11, 20))
    assert period.start == end
    assert period.end == end + (end - start)
    far = current_period(start, end, at(2027, 1, 1))
    assert far.contains(at(2027, 1, 1))
    assert (far.start - end) % (end - start) == timedelta(0)


def test_period_boundary_belongs_to_the_next_period():
    start, end = at(2026, 10, 15), at(2026, 11, 15)
    assert current_period(start, end, end).start == end
    assert current_period(start, end, end - timedelta(microseconds=1)).start == start
