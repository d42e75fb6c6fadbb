"""webhook.check_signature: Stripe's scheme through the stripe library, against every configured secret."""

import time

from billing_webhooks import metrics
from billing_webhooks.inbox.webhook import SignatureFailure, check_signature
from driftlock_cli import stripe_player

NEW, OLD, OTHER = "whsec_new_secret_value", "whsec_old_secret_value", "whsec_someone_else"
BODY = b'{"id":"evt_1","object":"event"}'


def header(secret: str, timestamp: int | None = None, body: bytes = BODY) -> str:
    return stripe_player.sign(body, secret, timestamp)


def check(sig: str | None, secrets=(NEW, OLD)) -> SignatureFailure | None:
    return check_signature(BODY.decode(), sig, secrets)


def test_either_configured_secret_verifies():
    assert check(header(NEW)) is None
    assert check(header(OLD)) is None


def test_a_header_with_a_signature_per_secret_verifies_with_either():
    t = int(time.time())
    both = f"{header(OTHER, t)},v1={header(OLD, t).split('v1=')[1]}"
    assert check(both) is None


def test_reasons():
    assert check(None) is SignatureFailure.MISSING
    assert check("") is SignatureFailure.MISSING
    assert check("v1=abc") is SignatureFailure.MALFORMED
    assert check("t=now,v1=abc") is SignatureFailure.MALFORMED
    assert check(f"t={int(time.time())}") is SignatureFailure.MALFORMED
    assert check(header(OTHER)) is SignatureFailure.MISMATCH
    assert check(header(NEW, body=BODY + b" ")) is SignatureFailure.MISMATCH
    assert check(header(NEW, int(time.time()) - 301)) is SignatureFailure.EXPIRED
    assert check(header(OTHER, int(time.time()) - 301)) is SignatureFailure.MISMATCH


def test_within_the_tolerance_is_accepted():
    assert check(header(OLD, int(time.time()) - 240)) is None


def test_the_metric_starts_every_reason_at_zero():
    labels = {sample.labels["reason"] for family in metrics.SIGNATURE_FAILURES.collect() for sample in family.samples}
    assert labels == {reason.value for reason in SignatureFailure}
