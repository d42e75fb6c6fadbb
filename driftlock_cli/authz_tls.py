"""gRPC channels to authz as Envoy reaches it: plain, or with the client certificate authz requires (mutual TLS,
DRIFTLOCK_ENVOY_AUTHZ_CLIENT_CERT and friends), so that the CLI's health checks pass where Envoy's calls do."""

from collections.abc import Sequence
from typing import Any

import grpc

from driftlock_kernel import tls_files
from driftlock_kernel.settings import AuthzClientTls


def channel(target: str, tls: AuthzClientTls | None, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A channel to authz at `target`: with `tls`, showing the client certificate and trusting only its CA."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    cert, key = tls_files.key_pair(
        "DRIFTLOCK_ENVOY_AUTHZ_CLIENT_CERT", tls.cert_path, "DRIFTLOCK_ENVOY_AUTHZ_CLIENT_KEY", tls.key_path
    )
    ca = tls_files.certificates("DRIFTLOCK_AUTHZ_TLS_CA", tls.ca_path)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    # The name authz's certificate is checked against, when it is not the host dialled (a service name).
    named = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.aio.secure_channel(target, credentials, options=[*options, *named])
