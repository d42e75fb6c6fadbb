"""Secrets that can be guessed are refused at start-up, with a message that says how to make one."""

import secrets

import pytest

from driftlock_kernel import secret_strength
from driftlock_kernel.settings import Settings, SettingsError

WEAK = [
    " " * 32,
    "a" * 32,
    "ab" * 16,
    "changeme" * 4,
    "abcdefghijklmnopqrstuvwxyz012345",
    "0123456789" * 4,
    "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbcccc",
]
GENERATED = [
    lambda: secrets.token_urlsafe(48),  # what the docs say to use
    lambda: secrets.token_urlsafe(32),
    lambda: secrets.token_hex(32),
    lambda: secrets.token_hex(16),  # 32 hexadecimal characters: 128 bits
]


@pytest.mark.parametrize("secret", WEAK)
def test_a_guessable_jwt_secret_is_refused_with_how_to_make_one(secret):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DRIFTLOCK_JWT_SECRET": secret}).require_jwt_secret()
    message = str(caught.value)
    assert "DRIFTLOCK_JWT_SECRET" in message and "openssl rand" in message and "\n" not in message
    assert secret.strip() not in message or not secret.strip()  # the secret itself is never echoed


@pytest.mark.parametrize("make", GENERATED)
def test_generated_secrets_pass(make):
    for _ in range(50):
        secret = make()
        assert secret_strength.weakness(secret, min_bytes=32) is None, secret


def test_a_short_secret_says_how_long_it_must_be():
    with pytest.raises(SettingsError, match="at least 32"):
        Settings.from_env({"DRIFTLOCK_JWT_SECRET": "short"}).require_jwt_secret()


@pytest.mark.parametrize(
    "value",
    ["whsec_", "whsec_" + "a" * 32, "whsec_" + " " * 32, f"whsec_{secrets.token_urlsafe(32)},whsec_second"],
)
def test_a_guessable_webhook_secret_is_refused(value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"STRIPE_WEBHOOK_SECRET": value}).require_webhook_secrets()
    assert "STRIPE_WEBHOOK_SECRET" in str(caught.value) and "Stripe Dashboard" in str(caught.value)


def test_stripe_shaped_webhook_secrets_pass():
    stripe_like = "whsec_" + "".join(
        secrets.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(32)
    )
    cli_like = "whsec_" + secrets.token_hex(32)  # what `stripe listen` prints
    settings = Settings.from_env({"STRIPE_WEBHOOK_SECRET": f"{stripe_like},{cli_like}"})
    assert settings.require_webhook_secrets() == (stripe_like, cli_like)


def test_the_ext_authz_secret_is_required_and_checked():
    with pytest.raises(SettingsError, match="DRIFTLOCK_EXT_AUTHZ_SECRET is not set"):
        Settings.from_env({}).require_ext_authz_secret()
    with pytest.raises(SettingsError, match="DRIFTLOCK_EXT_AUTHZ_SECRET is a repeated pattern"):
        Settings.from_env({"DRIFTLOCK_EXT_AUTHZ_SECRET": "x" * 40}).require_ext_authz_secret()
    good = secrets.token_urlsafe(48)
    assert Settings.from_env({"DRIFTLOCK_EXT_AUTHZ_SECRET": good}).require_ext_authz_secret() == good.encode()
