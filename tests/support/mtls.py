"""Certificates for mutual TLS between Envoy and authz: throw-away CAs (trustme) written as PEM files."""

from dataclasses import dataclass
from pathlib import Path

import trustme

from driftlock_kernel.settings import AuthzClientTls, AuthzServerTls, Settings


@dataclass(frozen=True)
class MutualTls:
    server: AuthzServerTls  # what authz serves and whom it accepts
    client: AuthzClientTls  # what Envoy shows, signed by the client CA authz accepts
    stranger: AuthzClientTls  # a certificate from another CA: refused

    def server_env(self) -> dict[str, str]:
        return Settings.environment_for(
            authz_tls_cert_path=self.server.cert_path,
            authz_tls_key_path=self.server.key_path,
            authz_tls_client_ca_path=self.server.client_ca_path,
        )

    def client_env(self) -> dict[str, str]:
        return Settings.environment_for(
            envoy_authz_client_cert_path=self.client.cert_path,
            envoy_authz_client_key_path=self.client.key_path,
            authz_tls_ca_path=self.client.ca_path,
        )


def _issue(ca: trustme.CA, directory: Path, name: str, *identities: str) -> tuple[str, str]:
    issued = ca.issue_cert(*identities)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def mutual_tls(directory: Path) -> MutualTls:
    directory.mkdir(parents=True, exist_ok=True)
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    for name, ca in (("server-ca", server_ca), ("client-ca", client_ca)):
        ca.cert_pem.write_to_path(str(directory / f"{name}.crt"))
    server_cert, server_key = _issue(server_ca, directory, "authz", "127.0.0.1", "localhost", "authz")
    client_cert, client_key = _issue(client_ca, directory, "envoy", "envoy")
    stranger_cert, stranger_key = _issue(other_ca, directory, "stranger", "envoy")
    server_ca_path = str(directory / "server-ca.crt")
    return MutualTls(
        server=AuthzServerTls(server_cert, server_key, str(directory / "client-ca.crt")),
        client=AuthzClientTls(client_cert, client_key, server_ca_path),
        stranger=AuthzClientTls(stranger_cert, stranger_key, server_ca_path),
    )
