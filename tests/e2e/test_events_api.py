"""Event endpoints through the management API as the dashboard's server calls it (JSON through Envoy -> the two
authz replicas -> PostgreSQL), and what the endpoints then receive from the running gateway."""

import pytest

from tests.support.admin import JsonApi
from tests.support.net import eventually
from tests.support.webhook_receiver import WebhookReceiver, verify_standard_webhook


@pytest.fixture
def api(gateway, admin_secret) -> JsonApi:
    return JsonApi(gateway.management_port, admin_secret)


async def test_an_org_token_manages_its_own_endpoints_receives_a_signed_test_and_its_events(api, make_org, gateway):
    from tests.conftest import ALERT_SECRET

    org = await make_org()
    other = await make_org()
    receiver = await WebhookReceiver("").start()
    try:
        created = await api.call(
            "POST", f"/v1/orgs/{org.id}/event_endpoints", {"url": receiver.url, "event_types": []}, org_id=org.id
        )
        assert created.status == 200, created.body
        secret = created.json()["secret"]
        endpoint = created.json()["endpoint"]
        assert secret.startswith("whsec_") and endpoint["enabled"] is True
        receiver.secret = secret
        listed = await api.call("GET", f"/v1/orgs/{org.id}/event_endpoints", org_id=org.id)
        assert [e["id"] for e in listed.json()["endpoints"]] == [endpoint["id"]]
        assert secret not in listed.body.decode(), "the secret is shown once"

        # Another organisation's token sees, adds, tests and removes nothing here.
        for method, path, body in (
            ("GET", f"/v1/orgs/{org.id}/event_endpoints", None),
            ("POST", f"/v1/orgs/{org.id}/event_endpoints", {"url": receiver.url}),
            ("POST", f"/v1/event_endpoints/{endpoint['id']}:test", {}),
            ("DELETE", f"/v1/event_endpoints/{endpoint['id']}", None),
            ("GET", f"/v1/orgs/{org.id}/event_deliveries", None),
        ):
            refused = await api.call(method, path, body, org_id=other.id)
            assert refused.status == 403, (method, path, refused.body)

        tested = await api.call("POST", f"/v1/event_endpoints/{endpoint['id']}:test", {}, org_id=org.id)
        assert tested.status == 200, tested.body

        async def received_test() -> bool:
            return bool(receiver.of_type("event_endpoint.test"))

        await eventually(received_test, within=15, what="the test event at the endpoint")
        delivered = receiver.of_type("event_endpoint.test")[0]
        assert delivered.verified and delivered.webhook_id == tested.json()["event_id"]

        async def listed_delivered() -> bool:
            deliveries = await api.call("GET", f"/v1/orgs/{org.id}/event_deliveries?state=delivered", org_id=org.id)
            return any(d["event_id"] == delivered.webhook_id for d in deliveries.json()["deliveries"])

        await eventually(listed_delivered, within=10, what="the delivery listed as delivered")

        removed = await api.call("DELETE", f"/v1/event_endpoints/{endpoint['id']}", org_id=org.id)
        assert removed.status == 200
        assert (await api.call("GET", f"/v1/orgs/{org.id}/event_endpoints", org_id=org.id)).json()["endpoints"] == []
    finally:
        await receiver.stop()

    # The operator's endpoint (here through the deprecated alert-webhook variables) heard nothing of the test
    # but hears every organisation's events, signed with that secret's bytes.
    assert all(verify_standard_webhook(ALERT_SECRET, dict(r.headers), r.body) for r in gateway.alerts.received), (
        "an operator delivery failed verification"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "ftp://example.com/x",
        "not a url",
        "http://[::ffff:169.254.169.254]/",
    ],
)
async def test_a_refused_url_is_a_400_and_stores_nothing(api, make_org, url):
    org = await make_org()
    answer = await api.call("POST", f"/v1/orgs/{org.id}/event_endpoints", {"url": url}, org_id=org.id)
    assert answer.status == 400, answer.body
    assert (await api.call("GET", f"/v1/orgs/{org.id}/event_endpoints", org_id=org.id)).json()["endpoints"] == []
