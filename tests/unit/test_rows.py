"""Rows to dataclasses: one mapper for every store, converting by the fields' types."""

import uuid
from dataclasses import dataclass

from driftlock_kernel import db
from driftlock_kernel.billing import Overage, SubscriptionStatus
from driftlock_kernel.keys import Environment, Scope


@dataclass(frozen=True)
class Example:
    id: uuid.UUID
    environment: Environment
    scopes: frozenset[Scope]
    names: tuple[str, ...]
    status: SubscriptionStatus | None
    overage: Overage = Overage.SOFT


def test_from_row_converts_enums_and_arrays_and_ignores_extra_columns():
    key = uuid.uuid4()
    row = {
        "id": key,
        "environment": "test",
        "scopes": ["read", "detect"],
        "names": ["a", "b"],
        "status": "past_due",
        "not_a_field": 1,
    }
    example = db.from_row(Example, row)
    assert example == Example(
        key, Environment.TEST, frozenset({Scope.READ, Scope.DETECT}), ("a", "b"), SubscriptionStatus.PAST_DUE
    )
    assert type(example.environment) is Environment and type(example.status) is SubscriptionStatus


def test_from_row_keeps_none_and_defaults():
    example = db.from_row(
        Example, {"id": uuid.uuid4(), "environment": "live", "scopes": [], "names": None, "status": None}
    )
    assert (example.status, example.names, example.overage) == (None, (), Overage.SOFT)
