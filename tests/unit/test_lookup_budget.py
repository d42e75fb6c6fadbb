"""The budget for looking up keys that do not exist: per source, overall, refunded for keys that exist."""

from authz_service.check.lookup_budget import LookupBudget


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_source_gets_its_rate_and_then_nothing_until_it_refills():
    clock = Clock()
    budget = LookupBudget(burst_seconds=1, overall=1000, per_source=5, clock=clock)
    assert [budget.reserve("10.0.0.1") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.2  # a fifth of a second: one look-up's worth
    assert budget.reserve("10.0.0.1") is True
    assert budget.reserve("10.0.0.1") is False


def test_one_source_spending_its_budget_leaves_the_others_theirs():
    budget = LookupBudget(burst_seconds=1, overall=1000, per_source=3, clock=Clock())
    while budget.reserve("10.0.0.1"):
        pass
    assert [budget.reserve("10.0.0.2") for _ in range(3)] == [True] * 3


def test_the_overall_budget_bounds_many_sources_together():
    budget = LookupBudget(burst_seconds=1, overall=10, per_source=5, clock=Clock())
    granted = sum(budget.reserve(f"10.0.{n // 256}.{n % 256}") for n in range(1000))
    assert granted == 10


def test_a_refunded_look_up_costs_nothing():
    budget = LookupBudget(burst_seconds=1, overall=1000, per_source=2, clock=Clock())
    for _ in range(50):  # keys that exist, looked up one after another
        assert budget.reserve("10.0.0.1")
        budget.refund("10.0.0.1")
    assert budget.reserve("10.0.0.1") and budget.reserve("10.0.0.1")
    assert not budget.reserve("10.0.0.1")


def test_a_refusal_takes_nothing_from_the_other_budget():
    clock = Clock()
    budget = LookupBudget(burst_seconds=1, overall=2, per_source=1, clock=clock)
    assert budget.reserve("a")
    assert not budget.reserve("a")  # its own bucket is empty; the overall one keeps its token
    assert budget.reserve("b")
    assert not budget.reserve("c")  # now the overall one is empty


def test_a_source_may_look_up_a_few_seconds_worth_at_once():
    budget = LookupBudget(overall=1000, per_source=10, clock=Clock())  # 5 s worth by default
    assert sum(budget.reserve("10.0.0.1") for _ in range(80)) == 50
