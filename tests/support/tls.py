"""Certificates for the edge's TLS tests: a throw-away CA (trustme) and a server certificate for 127.0.0.1."""

import ssl
from pathlib import Path

import trustme

_CA = trustme.CA()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A server certificate (chain) and its key for 127.0.0.1 and localhost, as PEM files in `directory`."""
    server = _CA.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "edge.crt", directory / "edge.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    return cert, key


def client_context() -> ssl.SSLContext:
    """A client that trusts only the test CA."""
    context = ssl.create_default_context()
    _CA.configure_trust(context)
    return context
