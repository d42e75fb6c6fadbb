"""The production files parse and name things that exist (no Docker engine runs here to try them)."""

from pathlib import Path

import yaml

from driftlock_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_run_commands_the_cli_has():
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if s.get("image", "").startswith("driftlock-gateway")}
    assert {"migrate", "authz", "envoy"} <= set(ours)
    for name, service in ours.items():
        assert callable(build_parser().parse_args(service["command"]).handler), name


def test_compose_requires_the_secrets_instead_of_defaulting_them():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${DRIFTLOCK_JWT_SECRET:?" in text
    assert "${DRIFTLOCK_BACKEND:?" in text


def test_authz_replicas_keep_spilled_units_on_a_volume():
    authz = compose()["services"]["authz"]
    spill = authz["environment"]["DRIFTLOCK_METER_SPILL_DIR"]
    assert any(volume.endswith(":" + spill) for volume in authz["volumes"])
    assert authz["environment"]["DATABASE_URL"]  # the shared environment is merged in, not replaced


def test_prometheus_scrapes_the_metrics_ports():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["driftlock-authz"]["dns_sd_configs"][0]["port"] == 9464


def test_compose_requires_the_management_secrets_and_never_publishes_the_management_listener():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${DRIFTLOCK_ADMIN_TOKEN_SECRET:?" in text and "${DRIFTLOCK_CONTEXT_SIGNING_KEYS:?" in text
    envoy = compose()["services"]["envoy"]
    assert envoy["environment"]["DRIFTLOCK_ADMIN_HOST"] == "0.0.0.0"
    assert not any("8082" in port for port in envoy["ports"]) and "8082" in envoy["expose"]
