"""Billing periods: the Stripe subscription's current period where there is one, else the calendar month (UTC)."""

from dataclasses import dataclass
from datetime import UTC, datetime

from driftlock_kernel.caches import LruCache


@dataclass(frozen=True, slots=True)
class Period:
    start: datetime
    end: datetime

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def calendar_month(now: datetime) -> Period:
    now = now.astimezone(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return Period(start, end)


def current_period(subscription_start: datetime | None, subscription_end: datetime | None, now: datetime) -> Period:
    """The period that `now` falls in.

    When the stored subscription period has ended but Stripe's renewal event has not arrived yet, the period is
    rolled forward by its own length: the next period starts exactly where the stored one ended, which is what
    Stripe will report, so usage counted meanwhile is keyed by the right period start.
    """
    if subscription_start is None or subscription_end is None or subscription_end <= subscription_start:
        return calendar_month(now)
    start, end = subscription_start, subscription_end
    if now < start:
        return calendar_month(now)
    if now >= end:
        length = end - start
        skipped = (now - end) // length
        start = end + skipped * length
        end = start + length
    return Period(start, end)


class PeriodFinder:
    """`current_period` for Unix times, remembered per stored period, so that a check builds no datetimes."""

    def __init__(self, max_entries: int = 10_000):
        # (subscription start, end) -> (period, its start and end as Unix times)
        self._known: LruCache[tuple[float | None, float | None], tuple[Period, float, float]] = LruCache(max_entries)

    def period(self, subscription_start: float | None, subscription_end: float | None, now: float) -> Period:
        stored = (subscription_start, subscription_end)
        known = self._known.get(stored)
        if known is not None and known[1] <= now < known[2]:
            return known[0]
        period = current_period(
            _datetime(subscription_start), _datetime(subscription_end), datetime.fromtimestamp(now, UTC)
        )
        self._known.put(stored, (period, period.start.timestamp(), period.end.timestamp()))
        return period


def _datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
