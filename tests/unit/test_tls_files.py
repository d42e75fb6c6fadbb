"""The PEM files of mutual TLS are checked at start: each mistake is one line naming its variable."""

import pytest

from driftlock_kernel import tls_files
from driftlock_kernel.settings import SettingsError
from tests.support.mtls import mutual_tls


def test_a_matching_pair_and_a_ca_are_read(tmp_path):
    certs = mutual_tls(tmp_path)
    cert, key = tls_files.key_pair("C", certs.client.cert_path, "K", certs.client.key_path)
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" in key
    assert tls_files.certificates("CA", certs.client.ca_path).startswith(b"-----BEGIN CERTIFICATE-----")


def test_each_mistake_names_its_variable(tmp_path):
    certs = mutual_tls(tmp_path)
    with pytest.raises(SettingsError, match=r"^K: .* is not the key of C"):
        tls_files.key_pair("C", certs.client.cert_path, "K", certs.stranger.key_path)
    with pytest.raises(SettingsError, match=r"^K: .* holds no unencrypted PEM private key"):
        tls_files.key_pair("C", certs.client.cert_path, "K", certs.client.cert_path)
    with pytest.raises(SettingsError, match=r"^CA: .* holds no PEM certificate"):
        tls_files.certificates("CA", certs.client.key_path)
    with pytest.raises(SettingsError, match=r"^CA: cannot read .*missing.pem"):
        tls_files.certificates("CA", str(tmp_path / "missing.pem"))
