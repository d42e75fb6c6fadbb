"""The whole gateway as local processes: demo backend, authz replicas, the webhook service, Envoy. Used by `dev`
and the tests.

Each service runs as its own process, exactly as `driftlock-gateway authz` would in production; only the
addresses differ.
"""

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from driftlock_gateway import envoy_config
from driftlock_gateway.settings import HostPort
from driftlock_gateway.supervisor import Child, grpc_serving, http_ok, start_child, tcp_open, wait_until

READY_TIMEOUT_SECONDS = 60.0
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class StackPorts:
    envoy: int = 8080
    envoy_admin: int = 9901
    authz: tuple[int, ...] = (9191,)
    authz_metrics: tuple[int, ...] = (9464,)
    webhooks: int = 8081
    backend: int = 8000


@dataclass
class Stack:
    ports: StackPorts
    backend: HostPort
    envoy_config_path: Path
    children: dict[str, Child] = field(default_factory=dict)

    @property
    def envoy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.envoy}"

    @property
    def webhooks_url(self) -> str:
        """The webhook service itself (Stripe reaches it through Envoy, at envoy_url + /stripe/webhook)."""
        return f"http://{LOOPBACK}:{self.ports.webhooks}"

    def authz_target(self, replica: int = 0) -> str:
        return f"{LOOPBACK}:{self.ports.authz[replica]}"

    async def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """Stop Envoy first (no new requests), then the services; return each child's exit code."""
        order = sorted(self.children, key=lambda name: (name != "envoy", name))
        codes = {}
        for name in order:
            codes[name] = await self.children[name].stop(timeout)
        return codes


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


async def start_stack(
    *,
    database_url: str,
    jwt_secret: str,
    state_dir: Path,
    ports: StackPorts = StackPorts(),
    backend: HostPort | None = None,
    log_dir: Path | None = None,
    output: IO[str] | None = None,
    extra_env: dict[str, str] | None = None,
    envoy_concurrency: int = 1,
    webhook_secret: str | None = None,
) -> Stack:
    """Start everything and wait until it serves; on failure, stop what was started and raise ChildFailed.

    The webhook service starts when `webhook_secret` (one or more whsec_ secrets, comma-separated) is given;
    without it Envoy's `webhooks` cluster points at `ports.webhooks`, where the caller may run something else.
    Output of each child goes to `log_dir/<name>.log`, or to `output` with a `[name]` prefix.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    common_env = {
        "DATABASE_URL": database_url,
        "DRIFTLOCK_JWT_SECRET": jwt_secret,
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    target_backend = backend or HostPort(LOOPBACK, ports.backend)
    config = envoy_config.render(
        envoy_config.load_shipped(),
        listen=HostPort("0.0.0.0", ports.envoy),
        admin_port=ports.envoy_admin,
        backend=target_backend,
        authz=[HostPort(LOOPBACK, port) for port in ports.authz],
        webhooks=HostPort(LOOPBACK, ports.webhooks),
    )
    stack = Stack(ports=ports, backend=target_backend, envoy_config_path=envoy_config.write(config, state_dir))

    async def launch(name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = await start_child(
            name,
            argv,
            env={**common_env, **(env or {})},
            log_file=(log_dir / f"{name}.log") if log_dir else None,
            prefix_output_to=None if log_dir else (output or sys.stderr),
        )
        stack.children[name] = child
        return child

    try:
        waits = []
        if backend is None:
            child = await launch(
                "backend", _python("driftlock_gateway.demo_backend", "--host", LOOPBACK, "--port", str(ports.backend))
            )
            waits.append(
                wait_until(
                    tcp_open(LOOPBACK, ports.backend),
                    timeout=READY_TIMEOUT_SECONDS,
                    what="the demo backend to listen",
                    child=child,
                )
            )
        for replica, (port, metrics_port) in enumerate(zip(ports.authz, ports.authz_metrics, strict=True)):
            name = "authz" if len(ports.authz) == 1 else f"authz-{replica + 1}"
            child = await launch(
                name,
                _python("driftlock_gateway.cli", "authz"),
                {
                    "DRIFTLOCK_AUTHZ_HOST": LOOPBACK,
                    "DRIFTLOCK_AUTHZ_PORT": str(port),
                    "DRIFTLOCK_AUTHZ_METRICS_PORT": str(metrics_port),
                },
            )
            waits.append(
                wait_until(
                    grpc_serving(f"{LOOPBACK}:{port}"),
                    timeout=READY_TIMEOUT_SECONDS,
                    what=f"{name} to serve",
                    child=child,
                )
            )
        if webhook_secret is not None:
            child = await launch(
                "webhooks",
                _python("driftlock_gateway.cli", "webhooks"),
                {
                    "STRIPE_WEBHOOK_SECRET": webhook_secret,
                    "DRIFTLOCK_WEBHOOKS_HOST": LOOPBACK,
                    "DRIFTLOCK_WEBHOOKS_PORT": str(ports.webhooks),
                },
            )
            waits.append(
                wait_until(
                    http_ok(f"{stack.webhooks_url}/healthz"),
                    timeout=READY_TIMEOUT_SECONDS,
                    what="the webhook service to be ready",
                    child=child,
                )
            )
        child = await launch("envoy", envoy_config.command(stack.envoy_config_path, concurrency=envoy_concurrency))
        waits.append(
            wait_until(
                http_ok(f"http://{LOOPBACK}:{ports.envoy_admin}/ready"),
                timeout=READY_TIMEOUT_SECONDS,
                what="Envoy to be ready",
                child=child,
            )
        )
        await asyncio.gather(*waits)
    except BaseException:
        await stack.stop()
        raise
    return stack
