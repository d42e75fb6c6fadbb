"""The alert rules load, and each one's unit test passes under promtool (Debian's `prometheus` package)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.observability import (
    RULE_TESTS,
    RULES,
    dashboard_exprs,
    metric_list,
    metric_names,
    rules,
    used_metrics,
)


def promtool() -> str:
    found = shutil.which("promtool") or next((p for p in ("/usr/bin/promtool",) if Path(p).exists()), None)
    if found is None:
        pytest.skip("promtool is not installed: apt-get install prometheus (it ships promtool)")
    return found


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid_promql():
    result = run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_passes_its_unit_tests():
    result = run("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_prometheus_config_is_valid_and_loads_the_rules():
    result = run("check", "config", str(RULES.parent / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_every_alert_has_a_test_in_which_it_fires():
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert {rule["alert"] for rule in rules()} == fired


def test_every_alert_has_a_severity_and_a_summary():
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_every_metric_a_rule_or_panel_uses_is_listed():
    listed = metric_list()
    known = {name for names in listed["exported"].values() for name in names} | set(listed["pending"])
    unlisted = {name: sorted(where) for name, where in used_metrics().items() if name not in known}
    assert unlisted == {}, "add them to deploy/prometheus/metrics.yml under the process that exports them"
    assert dashboard_exprs(), "the dashboard has panels"


def test_metric_names_skip_labels_and_grouping():
    expr = 'sum by (envoy_route) (rate(envoy_vhost_route_upstream_rq_xx{envoy_response_code_class="5"}[5m]))'
    assert metric_names(expr) == {"envoy_vhost_route_upstream_rq_xx"}
    assert metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(driftlock_authz_check_duration_seconds_bucket[5m])))"
    ) == {"driftlock_authz_check_duration_seconds"}
