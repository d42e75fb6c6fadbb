"""What the alert rules and the dashboard ask of the services: the metric families their queries name."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yml"
METRICS = ROOT / "deploy" / "prometheus" / "metrics.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"

_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"\b(?:driftlock_|envoy_)[a-z0-9_]+\b|\bup\b")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def metric_names(expr: str) -> set[str]:
    """The metric families a PromQL expression reads (label names inside {…} and by (…) are not metrics)."""
    bare = _GROUPING.sub(" ", _LABEL_MATCHERS.sub(" ", expr))
    return {_HISTOGRAM_SUFFIX.sub("", name) for name in _NAME.findall(bare)}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            # PromQL only: the usage-history dashboard's panels are SQL (tests/integration/test_usage_history.py).
            exprs += [target["expr"] for target in panel.get("targets", []) if "expr" in target]
    return exprs


def used_metrics() -> dict[str, set[str]]:
    """metric family -> where it is used (alert names, 'dashboard')."""
    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule["alert"])
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


def metric_list() -> dict:
    return yaml.safe_load(METRICS.read_text())
