"""Durations as operators write them: `90s`, `15m`, `12h`, `30d`."""

import re
from datetime import timedelta

_DURATION = re.compile(r"([1-9][0-9]{0,8})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse `<positive integer><s|m|h|d>`; raise ValueError with a message fit for a user."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"malformed duration {text!r}: write a whole number and a unit, like 90s, 15m, 12h or 30d")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
