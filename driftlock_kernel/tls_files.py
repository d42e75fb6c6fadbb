"""The PEM files of mutual TLS between Envoy and authz, read and checked at start: a missing file, a file that is
not what its variable names, or a key that does not belong to its certificate is one line naming the variable,
not gRPC's "failed to bind" or a handshake that fails for ever after."""

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from driftlock_kernel.settings import SettingsError


def _read(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SettingsError(f"{variable}: cannot read {path}: {error.strerror}") from None


def certificates(variable: str, path: str) -> bytes:
    """PEM certificates (a chain, or CAs): their bytes."""
    pem = _read(variable, path)
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SettingsError(f"{variable}: {path} holds no PEM certificate") from None
    return pem


def key_pair(cert_variable: str, cert_path: str, key_variable: str, key_path: str) -> tuple[bytes, bytes]:
    """A certificate chain and its private key, checked to belong together: (certificate, key) bytes."""
    cert_pem = certificates(cert_variable, cert_path)
    key_pem = _read(key_variable, key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise SettingsError(f"{key_variable}: {key_path} holds no unencrypted PEM private key") from None
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, raw) != leaf.public_key().public_bytes(
        serialization.Encoding.PEM, raw
    ):
        raise SettingsError(f"{key_variable}: {key_path} is not the key of {cert_variable} ({cert_path})")
    return cert_pem, key_pem
