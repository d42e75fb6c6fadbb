"""gRPC channels to authz as Envoy reaches it: plain, or with the client certificate authz requires (mutual TLS,
DRIFTLOCK_ENVOY_AUTHZ_CLIENT_CERT and friends), so that the CLI's health checks pass where Envoy's calls do."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from driftlock_kernel.settings import AuthzClientTls, SettingsError

_VARIABLES = ("DRIFTLOCK_ENVOY_AUTHZ_CLIENT_CERT", "DRIFTLOCK_ENVOY_AUTHZ_CLIENT_KEY", "DRIFTLOCK_AUTHZ_TLS_CA")


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SettingsError(f"{variable}: cannot read {path}: {error.strerror}") from None


def channel(target: str, tls: AuthzClientTls | None, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A channel to authz at `target`: with `tls`, showing the client certificate and trusting only its CA."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    cert, key, ca = (
        _read(variable, path)
        for variable, path in zip(_VARIABLES, (tls.cert_path, tls.key_path, tls.ca_path), strict=True)
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    # The name authz's certificate is checked against, when it is not the host dialled (a service name).
    named = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.aio.secure_channel(target, credentials, options=[*options, *named])
