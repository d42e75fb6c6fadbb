"""How much of a usage report the plan's cap lets count: reported units are capped exactly like units counted at
the edge, where a billable call that would pass the cap is refused and counts nothing. Pure: no I/O."""


def countable_units(cap: float | None, used_units: int, units: int) -> int:
    """Units of a report of `units` that count when `used_units` are counted already: all without a cap, else
    those that fit under it (none once it is reached)."""
    if cap is None:
        return units
    return max(0, min(units, int(cap) - used_units))


def cap_reached(cap: float | None, used_units: int) -> bool:
    return cap is not None and used_units >= cap
