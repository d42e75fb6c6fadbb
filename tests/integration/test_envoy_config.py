"""The shipped Envoy configuration: valid for the real binary, and a route table that says what each path is."""

import copy
from pathlib import Path

import pytest

from driftlock_cli import envoy_config
from driftlock_kernel.settings import HostPort, Settings


def hcm(config: dict, name: str = "public") -> dict:
    (listener,) = [item for item in config["static_resources"]["listeners"] if item["name"] == name]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def routes(config: dict) -> dict[str, dict]:
    (vhost,) = hcm(config)["route_config"]["virtual_hosts"]
    return {route["name"]: route for route in vhost["routes"]}


def ext_authz(route: dict) -> dict:
    return route.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {})


@pytest.fixture(scope="module")
def shipped() -> dict:
    return envoy_config.load_shipped()


def rendered(shipped, **options) -> dict:
    return envoy_config.render(
        shipped,
        listen=HostPort("127.0.0.1", 18080),
        admin_port=19901,
        backend=HostPort("backend.internal", 9000),
        authz=[HostPort("127.0.0.1", 19191), HostPort("127.0.0.1", 19192)],
        webhooks=HostPort("127.0.0.1", 18081),
        management=HostPort("127.0.0.1", 18082),
        stats=HostPort("0.0.0.0", 19902),
        **options,
    )


def listener(config: dict, name: str = "public") -> dict:
    (found,) = [item for item in config["static_resources"]["listeners"] if item["name"] == name]
    return found


def transcoder(config: dict) -> dict:
    (found,) = [f for f in hcm(config, "management")["http_filters"] if f["name"] == envoy_config.TRANSCODER]
    return found["typed_config"]


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
    assert listener(config, "stats")["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 19902}
    admin_endpoint = clusters["envoy_admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert admin_endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    stripped = copy.deepcopy(config)
    original = copy.deepcopy(shipped)
    assert listener(config, "management")["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18082}
    assert Path(transcoder(config)["proto_descriptor"]) == envoy_config.descriptor_set_path()
    for c in (stripped, original):
        c["admin"]["address"] = None
        for item in c["static_resources"]["listeners"]:
            item["address"] = None
        transcoder(c)["proto_descriptor"] = None
        for cluster in c["static_resources"]["clusters"]:
            cluster["load_assignment"] = None
    assert stripped == original


def test_an_envoy_rendered_without_a_management_address_has_no_management_listener(shipped):
    config = envoy_config.render(
        shipped,
        listen=HostPort("127.0.0.1", 18080),
        admin_port=19901,
        backend=HostPort("127.0.0.1", 9000),
        authz=[HostPort("127.0.0.1", 19191)],
        webhooks=HostPort("127.0.0.1", 18081),
    )
    assert [item["name"] for item in config["static_resources"]["listeners"]] == ["public"]


def test_the_management_listener_is_loopback_and_reaches_only_our_grpc_services(shipped):
    assert listener(shipped, "management")["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8082}
    management = hcm(shipped, "management")
    assert "envoy.filters.http.ext_authz" not in [f["name"] for f in management["http_filters"]]
    (vhost,) = management["route_config"]["virtual_hosts"]
    assert {route["route"]["cluster"] for route in vhost["routes"]} == {"authz"}
    for route in vhost["routes"]:
        assert route["match"]["grpc"] == {}
        assert route["match"]["safe_regex"]["regex"].startswith("/driftlock\\.(management|usage)")
    # The public listener never reaches the management API.
    public_clusters = {r["route"]["cluster"] for r in routes(shipped).values() if "route" in r}
    assert "authz" not in public_clusters


def test_the_transcoder_serves_every_service_of_our_protos(shipped):
    from google.protobuf import descriptor_pb2

    descriptor = descriptor_pb2.FileDescriptorSet.FromString(envoy_config.descriptor_set_path().read_bytes())
    ours = {
        f"{file.package}.{service.name}"
        for file in descriptor.file
        if file.package.startswith("driftlock.")
        for service in file.service
    }
    config = transcoder(shipped)
    assert set(config["services"]) == ours
    assert config["convert_grpc_status"] is True and config["auto_mapping"] is False


def test_without_a_stats_port_the_stats_listener_is_dropped(shipped):
    config = envoy_config.render(
        shipped,
        listen=HostPort("127.0.0.1", 18080),
        admin_port=19901,
        backend=HostPort("backend.internal", 9000),
        authz=[HostPort("127.0.0.1", 19191)],
        webhooks=HostPort("127.0.0.1", 18081),
    )
    assert [item["name"] for item in config["static_resources"]["listeners"]] == ["public"]
    assert "envoy_admin" not in {c["name"] for c in config["static_resources"]["clusters"]}


def test_the_stats_listener_routes_only_prometheus_and_ready_to_the_admin_interface(shipped):
    (vhost,) = hcm(shipped, "stats")["route_config"]["virtual_hosts"]
    exposed = {(r["match"]["path"], r["match"]["headers"][0]["string_match"]["exact"]) for r in vhost["routes"]}
    assert exposed == {("/stats/prometheus", "GET"), ("/ready", "GET")}
    assert {r["route"]["cluster"] for r in vhost["routes"]} == {"envoy_admin"}
    assert all(set(r["match"]) == {"path", "headers"} for r in vhost["routes"]), "exact paths only, no prefixes"


def test_every_forwarding_route_has_its_own_stats(shipped):
    for name, route in routes(shipped).items():
        if "route" in route:
            assert route.get("stat_prefix") == name


def test_tls_rendering_passes_envoy_validate(shipped, tmp_path):
    from tests.support.tls import self_signed

    cert, key = self_signed(tmp_path)
    config = rendered(shipped, tls=(str(cert), str(key)))
    socket = listener(config)["filter_chains"][0]["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    result = envoy_config.validate(envoy_config.write(config, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


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
