"""The shipped Envoy configuration: valid for the real binary, and a route table that says what each path is."""

import copy

import pytest

from driftlock_cli import envoy_config
from driftlock_kernel.settings import HostPort, Settings


def hcm(config: dict) -> dict:
    (listener,) = config["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def routes(config: dict) -> dict[str, dict]:
    (vhost,) = hcm(config)["route_config"]["virtual_hosts"]
    return {route["name"]: route for route in vhost["routes"]}


def ext_authz(route: dict) -> dict:
    return route.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {})


@pytest.fixture(scope="module")
def shipped() -> dict:
    return envoy_config.load_shipped()


def rendered(shipped) -> dict:
    return envoy_config.render(
        shipped,
        listen=HostPort("127.0.0.1", 18080),
        admin_port=19901,
        backend=HostPort("backend.internal", 9000),
        authz=[HostPort("127.0.0.1", 19191), HostPort("127.0.0.1", 19192)],
        webhooks=HostPort("127.0.0.1", 18081),
    )


def test_shipped_config_passes_envoy_validate():
    result = envoy_config.validate(envoy_config.shipped_config_path(Settings()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_config_passes_envoy_validate(shipped, tmp_path):
    result = envoy_config.validate(envoy_config.write(rendered(shipped), tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendering_changes_addresses_and_nothing_else(shipped):
    config = rendered(shipped)
    assert routes(config) == routes(shipped)
    assert hcm(config)["http_filters"] == hcm(shipped)["http_filters"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    authz_endpoints = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in clusters["authz"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert authz_endpoints == [19191, 19192]
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    stripped = copy.deepcopy(config)
    original = copy.deepcopy(shipped)
    for c in (stripped, original):
        c["admin"]["address"] = None
        c["static_resources"]["listeners"][0]["address"] = None
        for cluster in c["static_resources"]["clusters"]:
            cluster["load_assignment"] = None
    assert stripped == original


def test_admin_listens_on_loopback_only(shipped):
    assert shipped["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_every_api_route_declares_scope_and_billable_routes_a_product(shipped):
    for name, route in routes(shipped).items():
        if "route" not in route or route["route"]["cluster"] != "backend":
            continue
        context = ext_authz(route)["check_settings"]["context_extensions"]
        assert context["scope"] in {"detect", "ingest", "read"}, name
        assert context["billable"] in {"true", "false"}, name
        if context["billable"] == "true":
            assert context["product"] in {"stream", "monitor"}, name


def test_the_contract_route_table(shipped):
    table = routes(shipped)
    expected = {
        "stream_detect": ("/api/v1/stream/detect", "detect", "true", "stream"),
        "monitor_detect": ("/api/v1/monitor/detect", "detect", "true", "monitor"),
        "stream_ingest": ("/api/v1/stream/ingest", "ingest", "false", "stream"),
        "monitor_ingest": ("/api/v1/monitor/ingest", "ingest", "false", "monitor"),
    }
    for name, (prefix, scope, billable, product) in expected.items():
        route = table[name]
        assert route["match"] == {"path_separated_prefix": prefix}
        context = ext_authz(route)["check_settings"]["context_extensions"]
        assert (context["scope"], context["billable"], context["product"]) == (scope, billable, product)
    assert ext_authz(table["read"])["check_settings"]["context_extensions"] == {"scope": "read", "billable": "false"}
    assert ext_authz(table["stripe_webhook"])["disabled"] is True
    assert table["stripe_webhook"]["route"]["cluster"] == "webhooks"
    assert ext_authz(table["healthz"])["disabled"] is True
    assert "direct_response" in table["healthz"]


def test_edge_settings_that_metering_depends_on(shipped):
    manager = hcm(shipped)
    assert manager["normalize_path"] is True
    assert manager["merge_slashes"] is True
    assert manager["path_with_escaped_slashes_action"] == "UNESCAPE_AND_REDIRECT"
    assert manager["use_remote_address"] is True
    assert manager["preserve_external_request_id"] is False
    (authz_filter,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    settings = authz_filter["typed_config"]
    assert settings["failure_mode_allow"] is False
    assert settings["status_on_error"] == {"code": "ServiceUnavailable"}
    assert settings["grpc_service"]["timeout"]
