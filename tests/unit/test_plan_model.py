"""One plan model, in the kernel: authz decides with the same PlanLimits that a stored Plan is."""

import ast
from pathlib import Path

from authz_service.check import decision
from driftlock_kernel.billing import Overage, PlanLimits
from driftlock_kernel.plans import TEST_DEFAULTS, Plan

ROOT = Path(__file__).resolve().parents[2]


def test_no_module_but_the_kernels_declares_a_plan_shape():
    """A class with `included_units` and `overage` fields is a plan model (an alert keeps only the units it was
    raised against); only driftlock_kernel/billing.py declares one."""
    declaring = set()
    for package in ("driftlock_kernel", "authz_service", "billing_webhooks", "driftlock_cli"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef):
                    continue
                fields = {getattr(item.target, "id", None) for item in node.body if isinstance(item, ast.AnnAssign)}
                if {"included_units", "overage"} <= fields:
                    declaring.add(f"{path.relative_to(ROOT)}:{node.name}")
    assert declaring == {"driftlock_kernel/billing.py:PlanLimits"}


def test_a_stored_plan_is_the_limits_authz_decides_with():
    plan = Plan("small", 10, Overage.BLOCK, hard_cap_percent=None, rate_limit_rps=2.0, stripe_meter="calls")
    assert isinstance(plan, PlanLimits) and decision.PlanLimits is PlanLimits
    assert plan.unit_cap == 10.0
    assert decision.reservation_cap(plan, used_units=9, units=1, margin=5) == 10
    assert plan.test_limits == PlanLimits("small (test)", 1000, Overage.BLOCK, rate_limit_rps=5.0)


def test_what_test_keys_get_when_a_plan_does_not_say_is_the_models_default():
    limits = PlanLimits("p", 0, Overage.SOFT)
    assert TEST_DEFAULTS == {
        "test_included_units": limits.test_included_units,
        "test_rate_limit_rps": limits.test_rate_limit_rps,
    }
