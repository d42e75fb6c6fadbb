"""The shipped Envoy configuration: valid for the real binary, and a route table that says what each path is."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest

from authz_service.check.credentials import read_credential
from authz_service.check.decision import DenyCode
from authz_service.check.ext_authz import CALLER_SECRET_METADATA, CREDENTIAL_HEADERS
from driftlock_cli import envoy_config
from driftlock_kernel import usage
from driftlock_kernel.keys import Environment, ParsedKey, generate_key
from driftlock_kernel.settings import HostPort, Settings, SettingsError


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
            assert "product" in context, name
        if "product" in context:
            assert context["product"] in usage.PRODUCTS, name


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


# --- abuse resistance (issue 9) ------------------------------------------------------------------------------


def test_rendering_sets_the_ext_authz_secret_cors_and_the_per_source_limit_and_envoy_accepts_it(shipped, tmp_path):
    config = envoy_config.render(
        shipped,
        listen=HostPort("127.0.0.1", 18080),
        admin_port=19901,
        backend=HostPort("127.0.0.1", 9000),
        authz=[HostPort("127.0.0.1", 19191)],
        webhooks=HostPort("127.0.0.1", 18081),
        ext_authz_secret="s" * 10,
        cors_origins=("https://app.example.com", "*"),
        requests_per_source=250,
    )
    result = envoy_config.validate(envoy_config.write(config, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    manager = hcm(config)
    (authz_filter,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    assert authz_filter["typed_config"]["grpc_service"]["initial_metadata"] == [
        {"key": CALLER_SECRET_METADATA, "value": "s" * 10}
    ]
    (limiter,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.local_ratelimit"]
    assert limiter["typed_config"]["descriptors"][0]["token_bucket"] == {
        "max_tokens": 250,
        "tokens_per_fill": 25,
        "fill_interval": "0.1s",
    }
    (vhost,) = manager["route_config"]["virtual_hosts"]
    policy = vhost["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert policy["allow_origin_string_match"] == [
        {"exact": "https://app.example.com"},
        {"safe_regex": {"regex": ".*"}},
    ]
    assert policy["forward_not_matching_preflights"] is False
    names = [route["name"] for route in vhost["routes"]]
    assert names.index("cors_preflight") == names.index("unsafe_path") + 1
    assert (tmp_path / "envoy.yaml").stat().st_mode & 0o077 == 0  # the secret is readable by its owner only


def test_cors_is_off_and_the_per_source_limit_on_as_shipped(shipped):
    (vhost,) = hcm(shipped)["route_config"]["virtual_hosts"]
    assert "envoy.filters.http.cors" not in vhost.get("typed_per_filter_config", {})
    assert "cors_preflight" not in routes(shipped)
    names = [f["name"] for f in hcm(shipped)["http_filters"]]
    # CORS first (preflights), then the per-source limit and the key checksum, before ext_authz; the router last.
    assert names == [
        "envoy.filters.http.cors",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.lua",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.buffer",
        "envoy.filters.http.router",
    ]
    without_limit = envoy_config.render(
        shipped,
        listen=HostPort("127.0.0.1", 18080),
        admin_port=19901,
        backend=HostPort("127.0.0.1", 9000),
        authz=[HostPort("127.0.0.1", 19191)],
        webhooks=HostPort("127.0.0.1", 18081),
        requests_per_source=0,
    )
    assert "envoy.filters.http.local_ratelimit" not in [f["name"] for f in hcm(without_limit)["http_filters"]]


def test_every_refusal_of_the_route_table_names_its_code_and_message(shipped):
    for name, route in routes(shipped).items():
        answer = route.get("direct_response")
        if answer is None or answer["status"] < 400:
            continue
        assert route["metadata"]["filter_metadata"]["driftlock"]["code"], name
        assert answer["body"]["inline_string"], name
        assert ext_authz(route)["disabled"] is True, name
    for name, route in routes(shipped).items():
        if route.get("route", {}).get("cluster") == "backend":
            # The key checksum runs here; its refusal is invalid_api_key.
            assert "envoy.filters.http.lua" in route["typed_per_filter_config"], name
            assert route["metadata"]["filter_metadata"]["driftlock"]["code"] == "invalid_api_key", name


def test_the_route_tables_credential_patterns_let_through_every_key_authz_accepts(shipped):
    """The refusal routes may turn away only what authz would turn away: checked against credentials.py on keys
    and spellings of all kinds (RE2 and Python agree on these patterns)."""
    table = routes(shipped)

    def refused_by(route_name: str, headers: dict[str, str]) -> bool:
        matchers = table[route_name]["match"]["headers"]
        for matcher in matchers:
            value = headers.get(matcher["name"], "")
            matched = re.fullmatch(matcher["string_match"]["safe_regex"]["regex"], value) is not None
            if matched == matcher.get("invert_match", False):
                return False
        return True

    keys = [generate_key(Environment.LIVE).secret for _ in range(50)] + [
        generate_key(Environment.TEST).secret for _ in range(50)
    ]
    cases = [{}, {"authorization": "Bearer"}, {"authorization": "Basic abc"}, {"x-api-key": "junk"}]
    for key in keys:
        cases += [
            {"authorization": f"Bearer {key}"},
            {"authorization": f"bearer  {key}"},
            {"authorization": f"BEARER {key}"},
            {"x-api-key": key},
            {"authorization": "Basic abc", "x-api-key": key},
            {"authorization": f"Bearer {key[:-1]}"},
            {"authorization": f"Bearer {key}x"},
            {"x-api-key": key.replace("dlk_", "dlx_")},
        ]
    for headers in cases:
        read = read_credential(headers)
        if read is DenyCode.MISSING_API_KEY:
            assert refused_by("missing_api_key", headers), headers
        elif isinstance(read, ParsedKey):
            assert not refused_by("missing_api_key", headers), headers
            assert not refused_by("malformed_api_key", headers), headers


def test_the_unsafe_path_pattern(shipped):
    pattern = routes(shipped)["unsafe_path"]["match"]["safe_regex"]["regex"]
    refused = [
        "/api/v1/stream;x/detect",
        "/api/v1/stream%3Bx/detect",
        "/api/v1/stream/%2564etect",
        "/api/v1/stream%20/detect",
        "/api/v1/models/%7f",
        "/api/v1/models/%1B",
    ]
    allowed = ["/api/v1/stream/detect", "/api/v1/models/abc-123", "/api/v1/models/caf%C3%A9", "/api/v1/x%2Dy"]
    assert [p for p in refused if not re.fullmatch(pattern, p)] == []
    assert [p for p in allowed if re.fullmatch(pattern, p)] == []


def test_the_webhook_route_buffers_bodies_and_cuts_slow_clients(shipped):
    route = routes(shipped)["stripe_webhook"]
    assert route["typed_per_filter_config"]["envoy.filters.http.buffer"]["buffer"]["max_request_bytes"] == 1024 * 1024
    assert route["route"]["idle_timeout"] and route["route"]["max_stream_duration"]["max_stream_duration"]
    clusters = {c["name"]: c for c in shipped["static_resources"]["clusters"]}
    assert clusters["webhooks"]["circuit_breakers"]["thresholds"][0]["max_requests"] <= 1024


def test_envoy_sends_authz_every_header_it_reads_and_no_other(shipped):
    """allowed_headers: what authz reads (the credentials, the request id) and what it must strip (any
    x-driftlock-* a client sent) reach it; other headers (cookies, user agents, bodies' types) do not."""
    (authz_filter,) = [f for f in hcm(shipped)["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    patterns = authz_filter["typed_config"]["allowed_headers"]["patterns"]

    def sent(name: str) -> bool:
        return any(name == p.get("exact") or name.startswith(p.get("prefix", "\0")) for p in patterns)

    for name in (*CREDENTIAL_HEADERS, "x-request-id", "x-driftlock-org-id", "x-driftlock-anything"):
        assert sent(name), name
    for name in ("cookie", "user-agent", "content-type", "x-forwarded-for", "x-envoy-original-path"):
        assert not sent(name), name


def test_mutual_tls_to_authz_renders_on_the_authz_cluster_and_passes_envoy_validate(shipped, tmp_path):
    """Every route to authz (checks, the access log, the management listener, health checks) goes through its one
    cluster: the client certificate there covers them all; no other cluster changes."""
    from tests.support.mtls import mutual_tls

    client = mutual_tls(tmp_path / "certs").client
    named = dataclasses.replace(client, server_name="authz")
    config = rendered(shipped, authz_tls=named)
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    context = clusters["authz"]["transport_socket"]["typed_config"]
    assert context["@type"].endswith("UpstreamTlsContext")
    assert context["sni"] == "authz"
    common = context["common_tls_context"]
    assert common["tls_certificates"] == [
        {"certificate_chain": {"filename": client.cert_path}, "private_key": {"filename": client.key_path}}
    ]
    assert common["validation_context"]["trusted_ca"] == {"filename": client.ca_path}
    assert common["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "authz"}}
    ]
    assert [name for name, cluster in clusters.items() if "transport_socket" in cluster] == ["authz"]
    # No other way to authz: one cluster per service.
    assert set(clusters) == {"backend", "authz", "webhooks", envoy_config.ADMIN_CLUSTER}
    for options in ({"authz_tls": client}, {"authz_tls": named}):
        result = envoy_config.validate(envoy_config.write(rendered(shipped, **options), tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
    assert "transport_socket" not in {c["name"]: c for c in rendered(shipped)["static_resources"]["clusters"]}["authz"]


def test_mutual_tls_settings_come_in_threes():
    with pytest.raises(SettingsError, match="together"):
        Settings.from_env(
            {"DRIFTLOCK_AUTHZ_TLS_CERT": "/a.crt", "DRIFTLOCK_AUTHZ_TLS_KEY": "/a.key"}
        ).authz_server_tls()
    with pytest.raises(SettingsError, match="together"):
        Settings.from_env({"DRIFTLOCK_AUTHZ_TLS_CA": "/ca.crt"}).authz_client_tls()
    assert Settings().authz_server_tls() is None and Settings().authz_client_tls() is None
