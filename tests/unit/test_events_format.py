"""The Standard Webhooks format and signature, the address policy for customers' URLs, and the settings of the
operator's endpoint: pure functions, checked against the published test vector and the test's own verifier."""

import time
from datetime import UTC, datetime

import pytest

from driftlock_kernel import event_examples, events
from driftlock_kernel.events import EventType
from driftlock_kernel.settings import Settings, SettingsError
from tests.support.webhook_receiver import verify_standard_webhook

# Published with the Standard Webhooks reference libraries.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_the_signature_matches_the_published_standard_webhooks_vector():
    key = events.secret_key(VECTOR_SECRET)
    signed = events.sign([key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signed == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_verify_with_an_independent_implementation_and_an_altered_body_does_not():
    secret = events.new_secret()
    body = events.body("key.revoked", datetime.now(UTC), {"key_id": "k", "org_id": "o"})
    headers = events.headers([events.secret_key(secret)], "evt_1", int(time.time()), body)
    assert verify_standard_webhook(secret, headers, body)
    assert not verify_standard_webhook(secret, headers, body + b" ")
    assert not verify_standard_webhook(events.new_secret(), headers, body)
    assert not verify_standard_webhook(secret, {**headers, "webhook-id": "evt_2"}, body)


def test_two_keys_while_rotating_give_two_signatures_either_verifies():
    old, new = events.new_secret(), events.new_secret()
    headers = events.headers([events.secret_key(old), events.secret_key(new)], "evt_1", 1, b"{}")
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify_standard_webhook(old, headers, b"{}", tolerance=10**10)
    assert verify_standard_webhook(new, headers, b"{}", tolerance=10**10)


def test_new_secrets_have_standard_webhooks_shape():
    secret = events.new_secret()
    assert secret.startswith("whsec_") and len(events.secret_key(secret)) == 32
    assert events.check_secret(secret) == secret
    with pytest.raises(ValueError):
        events.check_secret("not-whsec")
    with pytest.raises(ValueError):
        events.check_secret("whsec_c2hvcnQ=")  # "short"


def test_the_go_test_data_is_what_this_side_signs_now():
    assert event_examples.FIXTURE_PATH.read_text() == event_examples.render(), (
        "stale: run python -m driftlock_kernel.event_examples"
    )


def test_every_catalogue_type_has_an_example():
    assert set(event_examples.EXAMPLES) == {t for t in EventType if t is not EventType.ENDPOINT_DISABLED}


@pytest.mark.parametrize(
    ("address", "allow_private", "refused"),
    [
        ("93.184.216.34", False, None),
        ("2606:2800:220:1:248:1893:25c8:1946", False, None),
        ("127.0.0.1", False, "loopback"),
        ("::1", False, "loopback"),
        ("10.0.0.1", False, "private"),
        ("172.16.5.4", False, "private"),
        ("192.168.1.1", False, "private"),
        ("100.64.0.1", False, "private"),  # carrier-grade NAT: not global
        ("169.254.1.1", False, "link-local"),
        ("fe80::1", False, "link-local"),
        ("fd00::1", False, "private"),
        ("0.0.0.0", False, "private"),
        ("::ffff:127.0.0.1", False, "loopback"),
        ("169.254.169.254", False, "metadata"),
        ("169.254.169.254", True, "metadata"),
        ("::ffff:169.254.169.254", True, "metadata"),
        ("fd00:ec2::254", True, "metadata"),
        ("127.0.0.1", True, None),
        ("10.0.0.1", True, None),
    ],
)
def test_address_policy(address, allow_private, refused):
    reason = events.address_refusal(address, allow_private=allow_private)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "file:///etc/passwd", "http:///nohost", "https://u:p@example.com/", "javascript:x"]
)
def test_only_plain_http_urls(url):
    with pytest.raises(events.UrlRefused):
        events.check_url_shape(url)


def test_operator_endpoint_settings_new_old_and_refused():
    secret = events.new_secret()
    endpoint = Settings.from_env(
        {"DRIFTLOCK_EVENTS_WEBHOOK_URL": "https://ops.example/e", "DRIFTLOCK_EVENTS_WEBHOOK_SECRET": secret}
    ).operator_events_endpoint()
    assert endpoint == ("https://ops.example/e", (events.secret_key(secret),), False)
    old = "o" * 40
    endpoint = Settings.from_env(
        {"DRIFTLOCK_ALERT_WEBHOOK_URL": "https://ops.example/a", "DRIFTLOCK_ALERT_WEBHOOK_SECRET": old}
    ).operator_events_endpoint()
    assert endpoint == ("https://ops.example/a", (old.encode(),), True)
    assert Settings.from_env({}).operator_events_endpoint() is None
    with pytest.raises(SettingsError, match="SECRET"):
        Settings.from_env({"DRIFTLOCK_EVENTS_WEBHOOK_URL": "https://ops.example/e"}).operator_events_endpoint()
    with pytest.raises(SettingsError, match="whsec_"):
        Settings.from_env(
            {"DRIFTLOCK_EVENTS_WEBHOOK_URL": "https://x.example/", "DRIFTLOCK_EVENTS_WEBHOOK_SECRET": "plain"}
        ).operator_events_endpoint()
    assert Settings.from_env({"DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS": "true"}).events_allow_private_urls is True


def test_the_old_alert_variables_still_name_the_operator_endpoint_with_a_deprecation_line(caplog):
    from authz_service import server

    settings = Settings.from_env(
        {"DRIFTLOCK_ALERT_WEBHOOK_URL": "https://ops.example/a", "DRIFTLOCK_ALERT_WEBHOOK_SECRET": "o" * 40}
    )
    with caplog.at_level("WARNING"):
        deliverer = server._event_deliverer(settings, pool=None)  # type: ignore[arg-type]
    assert deliverer._operator is not None and deliverer._operator.url == "https://ops.example/a"
    assert any(
        "deprecated" in r.getMessage() and "DRIFTLOCK_EVENTS_WEBHOOK_URL" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    secret = events.new_secret()
    with caplog.at_level("WARNING"):
        server._event_deliverer(
            Settings.from_env(
                {"DRIFTLOCK_EVENTS_WEBHOOK_URL": "https://ops.example/e", "DRIFTLOCK_EVENTS_WEBHOOK_SECRET": secret}
            ),
            pool=None,  # type: ignore[arg-type]
        )
    assert not any("deprecated" in r.getMessage() for r in caplog.records)


def test_the_operator_events_url_and_secret_never_appear_in_the_repr_of_settings():
    secret = events.new_secret()
    settings = Settings.from_env(
        {
            "DRIFTLOCK_EVENTS_WEBHOOK_URL": "https://ops.example/e?token=url-token-8c1f",
            "DRIFTLOCK_EVENTS_WEBHOOK_SECRET": secret,
        }
    )
    assert settings.events_webhook_secrets == (secret,)
    for shown in (repr(settings), str(settings)):
        assert "url-token-8c1f" not in shown and secret.removeprefix("whsec_") not in shown
