"""The whole gateway as local processes: demo backend, authz replicas, the webhook service, Envoy. Used by `dev`
and the tests.

Each service runs as its own process, exactly as `driftlock-gateway authz` would in production; only the
addresses differ.
"""

import asyncio
import dataclasses
import functools
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from driftlock_cli import envoy_config
from driftlock_cli.supervisor import Child, free_port, grpc_serving, http_ok, start_child, tcp_open, wait_until
from driftlock_kernel import context_keys
from driftlock_kernel.settings import AuthzClientTls, AuthzServerTls, HostPort, Settings

READY_TIMEOUT_SECONDS = 60.0
LOOPBACK = "127.0.0.1"
DEFAULT_REQUESTS_PER_SOURCE = Settings().edge_requests_per_source


@dataclass(frozen=True)
class StackPorts:
    envoy: int
    envoy_admin: int
    authz: tuple[int, ...]  # one per replica
    authz_metrics: tuple[int, ...]
    webhooks: int
    backend: int
    # Envoy's management listener (JSON management API, JWKS); None: a free port, chosen at start.
    admin: int | None = None
    # Envoy's stats listener (/stats/prometheus, /ready); None: no such listener.
    envoy_stats: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "StackPorts":
        """The ports of a one-replica stack as the settings (and so the contract's defaults) name them."""
        return cls(
            envoy=settings.envoy_port,
            envoy_admin=settings.envoy_admin_port,
            authz=(settings.authz_port,),
            authz_metrics=(settings.authz_metrics_port,),
            webhooks=settings.webhooks_port,
            backend=settings.backend.port,
            admin=settings.admin_port,
            envoy_stats=settings.envoy_stats_port,
        )


@dataclass(frozen=True)
class _Spec:
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], Callable[[], Awaitable[bool]]]
    what: str


@dataclass
class Stack:
    ports: StackPorts
    backend: HostPort
    envoy_config_path: Path
    log_dir: Path | None = None
    output: IO[str] | None = None
    tls: bool = False
    children: dict[str, Child] = field(default_factory=dict)
    _specs: dict[str, _Spec] = field(default_factory=dict)

    @property
    def envoy_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.ports.envoy}"

    @property
    def envoy_stats_url(self) -> str | None:
        """Envoy's Prometheus endpoint, through its stats listener."""
        if self.ports.envoy_stats is None:
            return None
        return f"http://{LOOPBACK}:{self.ports.envoy_stats}/stats/prometheus"

    def authz_metrics_url(self, replica: int = 0) -> str:
        return f"http://{LOOPBACK}:{self.ports.authz_metrics[replica]}/metrics"

    @property
    def management_url(self) -> str:
        """Envoy's management listener: the JSON management API and /.well-known/jwks.json."""
        return f"http://{LOOPBACK}:{self.ports.admin}"

    @property
    def webhooks_url(self) -> str:
        """The webhook service itself (Stripe reaches it through Envoy, at envoy_url + /stripe/webhook)."""
        return f"http://{LOOPBACK}:{self.ports.webhooks}"

    def authz_target(self, replica: int = 0) -> str:
        return f"{LOOPBACK}:{self.ports.authz[replica]}"

    async def launch(self, name: str, spec: _Spec) -> Child:
        self._specs[name] = spec
        child = await start_child(
            name,
            spec.argv,
            env=spec.env,
            log_file=(self.log_dir / f"{name}.log") if self.log_dir else None,
            prefix_output_to=None if self.log_dir else (self.output or sys.stderr),
        )
        self.children[name] = child
        return child

    async def wait_ready(self, name: str) -> None:
        spec = self._specs[name]
        await wait_until(spec.ready(), timeout=READY_TIMEOUT_SECONDS, what=spec.what, child=self.children[name])

    async def restart(self, name: str) -> None:
        """Start a stopped child again, as it was first started, and wait until it serves."""
        if self.children[name].running:
            raise RuntimeError(f"{name} is still running")
        await self.launch(name, self._specs[name])
        await self.wait_ready(name)

    async def stop(self, timeout: float = 15.0) -> dict[str, int]:
        """Stop Envoy first (no new requests), then the services together; return each child's exit code."""
        codes = {}
        if "envoy" in self.children:
            codes["envoy"] = await self.children["envoy"].stop(timeout)
        others = [name for name in self.children if name != "envoy"]
        results = await asyncio.gather(*(self.children[name].stop(timeout) for name in others))
        codes.update(zip(others, results, strict=True))
        return codes


def _authz_tls_env(authz_mtls: tuple[AuthzServerTls, AuthzClientTls] | None) -> dict[str, str]:
    if authz_mtls is None:
        return {}
    server, _client = authz_mtls
    return Settings.environment_for(
        authz_tls_cert_path=server.cert_path,
        authz_tls_key_path=server.key_path,
        authz_tls_client_ca_path=server.client_ca_path,
    )


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


async def start_stack(
    *,
    database_url: str,
    jwt_secret: str | None,
    state_dir: Path,
    ports: StackPorts,
    backend: HostPort | None = None,
    log_dir: Path | None = None,
    output: IO[str] | None = None,
    extra_env: dict[str, str] | None = None,
    envoy_concurrency: int = 1,
    webhook_secret: str | None = None,
    admin_token_secret: str | None = None,
    context_signing_keys: Path | None = None,
    tls: tuple[str, str] | None = None,
    ext_authz_secret: str | None = None,
    cors_origins: Sequence[str] = (),
    requests_per_source: int = DEFAULT_REQUESTS_PER_SOURCE,
    backend_timeout: str | None = None,
    authz_mtls: tuple[AuthzServerTls, AuthzClientTls] | None = None,
) -> Stack:
    """Start everything and wait until it serves; on failure, stop what was started and raise ChildFailed.

    The webhook service starts when `webhook_secret` (one or more whsec_ secrets, comma-separated) is given;
    without it Envoy's `webhooks` cluster points at `ports.webhooks`, where the caller may run something else.
    Output of each child goes to `log_dir/<name>.log`, or to `output` with a `[name]` prefix. Units the meter
    could not write at shutdown are kept in `state_dir/meter-spill` for the next start. With `tls` (certificate
    and key files) Envoy's public listener speaks HTTPS.

    The management API answers when `admin_token_secret` is given (and refuses every call without it).
    Context tokens are EdDSA, signed by the key file `context_signing_keys` (a fresh key in
    `state_dir/context_signing_keys` when None), unless `extra_env` sets DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM=HS256.
    The secret Envoy shows authz with every check is `ext_authz_secret`, or one made for this stack. Every
    listener is on loopback. With `authz_mtls` (authz's side, Envoy's side) authz requires mutual TLS from Envoy.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    ext_authz_secret = ext_authz_secret or secrets.token_urlsafe(48)
    admin_port = ports.admin or free_port()
    ports = dataclasses.replace(ports, admin=admin_port)
    if context_signing_keys is None:
        context_signing_keys = state_dir / "context_signing_keys"
        if not context_signing_keys.exists():
            context_keys.write_key_file(context_signing_keys, (context_keys.Ed25519Key.generate(),))
    # Secrets not given are inherited from this process's environment, not blanked.
    given = {"jwt_secret": jwt_secret, "admin_token_secret": admin_token_secret}
    common_env = {
        **Settings.environment_for(
            database_url=database_url,
            context_signing_keys_file=context_signing_keys,
            ext_authz_secret=ext_authz_secret,
            meter_spill_dir=state_dir / "meter-spill",
            **{name: value for name, value in given.items() if value},
        ),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    target_backend = backend or HostPort(LOOPBACK, ports.backend)
    config = envoy_config.render(
        envoy_config.load_shipped(),
        # Loopback, like every other listener here: a development stack is not a public service.
        listen=HostPort(LOOPBACK, ports.envoy),
        admin_port=ports.envoy_admin,
        backend=target_backend,
        authz=[HostPort(LOOPBACK, port) for port in ports.authz],
        webhooks=HostPort(LOOPBACK, ports.webhooks),
        management=HostPort(LOOPBACK, admin_port),
        stats=None if ports.envoy_stats is None else HostPort(LOOPBACK, ports.envoy_stats),
        tls=tls,
        ext_authz_secret=ext_authz_secret,
        cors_origins=cors_origins,
        requests_per_source=requests_per_source,
        backend_timeout=backend_timeout,
        authz_tls=None if authz_mtls is None else authz_mtls[1],
    )
    stack = Stack(
        ports=ports,
        backend=target_backend,
        envoy_config_path=envoy_config.write(config, state_dir),
        log_dir=log_dir,
        output=output,
        tls=tls is not None,
    )
    specs: dict[str, _Spec] = {}
    if backend is None:
        specs["backend"] = _Spec(
            _python("driftlock_cli.demo_backend", "--host", LOOPBACK, "--port", str(ports.backend)),
            common_env,
            lambda: tcp_open(LOOPBACK, ports.backend),
            "the demo backend to listen",
        )
    for replica, (port, metrics_port) in enumerate(zip(ports.authz, ports.authz_metrics, strict=True)):
        name = "authz" if len(ports.authz) == 1 else f"authz-{replica + 1}"
        specs[name] = _Spec(
            _python("driftlock_cli", "authz"),
            {
                **common_env,
                **Settings.environment_for(
                    authz_host=LOOPBACK,
                    authz_port=port,
                    authz_metrics_port=metrics_port,
                    # Each replica its own spill file folder, so two replicas never replay each other's.
                    meter_spill_dir=state_dir / "meter-spill" / name,
                ),
                **_authz_tls_env(authz_mtls),
            },
            functools.partial(grpc_serving, f"{LOOPBACK}:{port}", tls=None if authz_mtls is None else authz_mtls[1]),
            f"{name} to serve",
        )
    if webhook_secret is not None:
        specs["webhooks"] = _Spec(
            _python("driftlock_cli", "webhooks"),
            {
                **common_env,
                **Settings.environment_for(
                    stripe_webhook_secrets=webhook_secret, webhooks_host=LOOPBACK, webhooks_port=ports.webhooks
                ),
            },
            lambda: http_ok(f"{stack.webhooks_url}/healthz"),
            "the webhook service to be ready",
        )
    specs["envoy"] = _Spec(
        envoy_config.command(
            stack.envoy_config_path,
            concurrency=envoy_concurrency,
            json_logs=common_env.get(Settings.variable("log_format"), Settings().log_format) == "json",
        ),
        common_env,
        lambda: http_ok(f"http://{LOOPBACK}:{ports.envoy_admin}/ready"),
        "Envoy to be ready",
    )
    try:
        for name, spec in specs.items():
            await stack.launch(name, spec)
        await asyncio.gather(*(stack.wait_ready(name) for name in specs))
    except BaseException:
        await stack.stop()
        raise
    return stack
