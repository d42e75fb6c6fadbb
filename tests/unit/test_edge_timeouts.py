"""The settle window (how long a counted unit waits for the refund of its call before it is reported to Stripe) comes
from Envoy's configured timeouts, the one source: the shipped config, and any config an operator points at."""

import copy
import logging
from datetime import timedelta

import pytest
import yaml

from billing_webhooks.app import export_rules
from driftlock_kernel import edge_timeouts
from driftlock_kernel.edge_timeouts import REFUND_DELIVERY_MARGIN_SECONDS, UnboundedCall
from driftlock_kernel.settings import Settings


def shipped() -> dict:
    return edge_timeouts.envoy_config(None)


def manager(config: dict) -> dict:
    (listener,) = [item for item in config["static_resources"]["listeners"] if item["name"] == "public"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_a_call_can_last_its_whole_trickled_body_and_then_the_backends_timeout():
    config = shipped()
    request = float(manager(config)["request_timeout"].removesuffix("s"))
    backend = max(
        float(route["route"]["timeout"].removesuffix("s"))
        for host in manager(config)["route_config"]["virtual_hosts"]
        for route in host["routes"]
        if route.get("route", {}).get("cluster") == "backend"
    )
    # The route timeout starts once the request is in, so the two add up (120 s + 60 s as shipped).
    assert edge_timeouts.longest_billable_call(config) == request + backend == 180.0
    assert edge_timeouts.settle_seconds(config) == 180.0 + REFUND_DELIVERY_MARGIN_SECONDS


def test_the_exporter_waits_what_envoys_config_says_unless_told_otherwise(caplog):
    derived = timedelta(seconds=edge_timeouts.settle_seconds(shipped()))
    assert Settings().stripe_settle_seconds is None
    assert export_rules(Settings()).settle == derived  # was 180 s, shorter than a call can last
    with caplog.at_level(logging.WARNING):
        assert export_rules(Settings(stripe_settle_seconds=4.0)).settle == timedelta(seconds=4)
    assert "shorter than a billable call can last" in caplog.text


def test_a_longer_route_timeout_in_the_config_lengthens_the_settle_window(tmp_path):
    config = shipped()
    for host in manager(config)["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            if route.get("route", {}).get("cluster") == "backend":
                route["route"]["timeout"] = "300s"
                break
    path = tmp_path / "envoy.yaml"

    path.write_text(yaml.safe_dump(config))
    rules = export_rules(Settings(envoy_config_path=str(path)))
    assert rules.settle == timedelta(seconds=120 + 300 + REFUND_DELIVERY_MARGIN_SECONDS)


@pytest.mark.parametrize("change", ["no_request_timeout", "route_timeout_0"])
def test_a_config_that_lets_a_call_last_without_end_is_refused(change):
    config = copy.deepcopy(shipped())
    if change == "no_request_timeout":
        del manager(config)["request_timeout"]
    else:
        for host in manager(config)["route_config"]["virtual_hosts"]:
            for route in host["routes"]:
                if route.get("route", {}).get("cluster") == "backend":
                    route["route"]["timeout"] = "0s"
    with pytest.raises(UnboundedCall):
        edge_timeouts.settle_seconds(config)
