from datetime import timedelta

import pytest

from driftlock_kernel.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("30d", timedelta(days=30)),
    ],
)
def test_parse_duration_accepts_the_documented_units(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "0d", "-1d", "1.5h", "30 days", "3x", "1w", "01d"])
def test_parse_duration_rejects_malformed_text(text):
    with pytest.raises(ValueError, match="malformed duration"):
        parse_duration(text)
