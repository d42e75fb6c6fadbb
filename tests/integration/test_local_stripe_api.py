"""The local Stripe API (tests/support/stripe_api.py) driven by the real `stripe` library, as DriftLock's code will
drive it: `stripe.StripeClient(key, base_addresses={"api": url})`, its async methods (aiohttp underneath) and its
sync ones (requests, run in a thread), its own retries and Idempotency-Key. Plus the server as a process."""

import asyncio
import base64
import signal
import sys
import time
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import requests
import stripe
from stripe.params.billing import MeterEventCreateParams, MeterEventSummaryListParams

from tests.support.net import eventually, free_port
from tests.support.stripe_api import DAY, METER_EVENTS, LocalStripe

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk_test_local0123456789abcdef"
CUSTOMER = "cus_LocalAcme001"
EVENT = "driftlock_api_calls"


@pytest.fixture
async def local_stripe():
    server = await LocalStripe().start()
    server.add_meter(EVENT)
    server.put_customer(CUSTOMER, email="billing@acme.test", name="Acme")
    yield server
    await server.stop()


@pytest.fixture
async def make_client(local_stripe):
    """StripeClient factory pointed at the local server; closes what it opened."""
    opened = []

    def make(*, retries: int = 0, timeout: float = 20.0, api_key: str = API_KEY) -> stripe.StripeClient:
        session = requests.Session()
        http = stripe.RequestsClient(
            timeout=timeout,
            session=session,
            async_fallback_client=stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=timeout)),
        )
        opened.append((http, session))
        return stripe.StripeClient(
            api_key, base_addresses={"api": local_stripe.url}, max_network_retries=retries, http_client=http
        )

    yield make
    for http, session in opened:
        await http.close_async()
        session.close()


@pytest.fixture(params=["async", "sync"])
def mode(request) -> str:
    return request.param


async def call(mode: str, method_async, method_sync, *args):
    """One library call, awaited natively or run in a worker thread."""
    if mode == "async":
        return await method_async(*args)
    return await asyncio.to_thread(method_sync, *args)


async def send_event(client, mode="async", *, value="5", identifier=None, options=None, **extra):
    params = {"event_name": EVENT, "payload": {"stripe_customer_id": CUSTOMER, "value": value}, **extra}
    if identifier is not None:
        params["identifier"] = identifier
    service = client.v1.billing.meter_events
    return await call(mode, service.create_async, service.create, params, options)


def meter_event_requests(server: LocalStripe):
    return [r for r in server.requests if r.path == METER_EVENTS]


def error_object(error: stripe.StripeError) -> stripe.ErrorObject:
    """The error object of the answer; the library types it optional because a failure to connect has none."""
    assert error.error is not None
    return error.error


# --- meter events -------------------------------------------------------------------------------------------


async def test_a_meter_event_is_accepted_answered_like_stripe_and_totalled(local_stripe, make_client, mode):
    client = make_client()
    event = await send_event(client, mode, value="5", identifier="batch-1")
    await send_event(client, mode, value="3", identifier="batch-2")

    assert event.object == "billing.meter_event"
    assert (event.event_name, event.identifier, event.livemode) == (EVENT, "batch-1", False)
    assert event.payload.to_dict() == {"stripe_customer_id": CUSTOMER, "value": "5"}
    assert abs(event.timestamp - time.time()) < 3600 and event.created >= event.timestamp - 1
    assert event.last_response.request_id.startswith("req_")
    assert local_stripe.total(CUSTOMER, EVENT) == 8
    assert [e.identifier for e in local_stripe.events(CUSTOMER)] == ["batch-1", "batch-2"]
    assert local_stripe.total("cus_someone_else", EVENT) == 0


async def test_event_summaries_aggregate_the_window_start_inclusive_end_exclusive(local_stripe, make_client):
    client = make_client()
    minute = int(time.time()) // 60 * 60 - 600
    for offset, value in ((0, "2"), (59, "3"), (60, "7")):
        await send_event(client, value=value, timestamp=minute + offset)
    (meter,) = (await client.v1.billing.meters.list_async()).data

    summaries = await client.v1.billing.meters.event_summaries.list_async(
        meter.id, {"customer": CUSTOMER, "start_time": minute, "end_time": minute + 60}
    )

    (summary,) = summaries.data
    assert summary.object == "billing.meter_event_summary"
    assert (summary.aggregated_value, summary.meter, summary.start_time, summary.end_time) == (
        5,
        meter.id,
        minute,
        minute + 60,
    )
    assert local_stripe.total(CUSTOMER, EVENT, minute, minute + 60) == 5
    with pytest.raises(stripe.InvalidRequestError) as misaligned:
        await client.v1.billing.meters.event_summaries.list_async(
            meter.id, {"customer": CUSTOMER, "start_time": minute + 1, "end_time": minute + 60}
        )
    assert misaligned.value.param == "start_time"
    with pytest.raises(stripe.InvalidRequestError) as no_customer:
        await client.v1.billing.meters.event_summaries.list_async(
            meter.id, {"start_time": minute, "end_time": minute + 60}
        )
    assert (no_customer.value.code, no_customer.value.param) == ("parameter_missing", "customer")


async def test_summaries_lag_behind_accepted_events_when_asked_to():
    """Stripe aggregates asynchronously; a client must not read a summary as proof of delivery."""
    server = await LocalStripe(summary_delay=DAY).start()
    try:
        server.add_meter(EVENT)
        server.put_customer(CUSTOMER)
        client = stripe.StripeClient(API_KEY, base_addresses={"api": server.url})
        minute = int(time.time()) // 60 * 60
        await asyncio.to_thread(
            client.v1.billing.meter_events.create,
            {"event_name": EVENT, "payload": {"stripe_customer_id": CUSTOMER, "value": "4"}},
        )
        (meter,) = (await asyncio.to_thread(client.v1.billing.meters.list)).data
        window: MeterEventSummaryListParams = {
            "customer": CUSTOMER,
            "start_time": minute - 60,
            "end_time": minute + 120,
        }

        before = await asyncio.to_thread(client.v1.billing.meters.event_summaries.list, meter.id, window)
        server.advance(DAY + 1)
        after = await asyncio.to_thread(client.v1.billing.meters.event_summaries.list, meter.id, window)

        assert (before.data[0].aggregated_value, after.data[0].aggregated_value) == (0, 4)
    finally:
        await server.stop()


async def test_a_duplicate_identifier_is_refused_as_stripe_does_and_not_counted(local_stripe, make_client, mode):
    client = make_client()
    await send_event(client, mode, value="5", identifier="org-1:2026-05")

    with pytest.raises(stripe.InvalidRequestError) as refused:
        await send_event(client, mode, value="5", identifier="org-1:2026-05")

    error = refused.value
    assert error.http_status == 400
    assert error.user_message == "An event already exists with identifier org-1:2026-05."
    assert (error.code, error.param, error_object(error).type) == (None, None, "invalid_request_error")
    assert error.headers is not None and error.headers["Stripe-Should-Retry"] == "false"
    assert error.request_id is not None and error.request_id.startswith("req_")
    assert local_stripe.total(CUSTOMER, EVENT) == 5
    assert len(local_stripe.events()) == 1


async def test_identifier_uniqueness_lasts_24_hours_and_then_lapses(local_stripe, make_client):
    client = make_client()
    await send_event(client, value="5", identifier="late-retry")
    local_stripe.advance(DAY - 60)
    with pytest.raises(stripe.InvalidRequestError):
        await send_event(client, value="5", identifier="late-retry")

    local_stripe.advance(120)
    await send_event(client, value="5", identifier="late-retry")

    assert local_stripe.total(CUSTOMER, EVENT) == 10


async def test_parameter_errors_are_typed_and_record_nothing(local_stripe, make_client):
    client = make_client()
    service = client.v1.billing.meter_events
    now = int(time.time())

    async def refusal(params) -> stripe.InvalidRequestError:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            await service.create_async(params)
        assert raised.value.http_status == 400
        return raised.value

    payload = {"stripe_customer_id": CUSTOMER, "value": "1"}
    missing = await refusal({"payload": payload})
    assert (missing.code, missing.param, missing.user_message) == (
        "parameter_missing",
        "event_name",
        "Missing required param: event_name.",
    )
    assert (await refusal({"event_name": EVENT})).param == "payload"
    unknown = await refusal({"event_name": EVENT, "payload": payload, "quantity": "1"})
    assert (unknown.code, unknown.param) == ("parameter_unknown", "quantity")
    not_integer = await refusal({"event_name": EVENT, "payload": payload, "timestamp": "yesterday"})
    assert (not_integer.code, not_integer.param) == ("parameter_invalid_integer", "timestamp")
    no_meter = await refusal({"event_name": "no_such_meter", "payload": payload})
    assert no_meter.user_message == 'No active meter found for event name "no_such_meter".'
    too_old = await refusal({"event_name": EVENT, "payload": payload, "timestamp": now - 35 * DAY - 120})
    assert too_old.user_message.startswith("The event timestamp cannot be more than 35 days in past.")
    too_new = await refusal({"event_name": EVENT, "payload": payload, "timestamp": now + 10 * 60})
    assert "5 minutes in the future" in too_new.user_message
    assert local_stripe.events() == []

    # The edges of the window are inside it.
    await service.create_async({"event_name": EVENT, "payload": payload, "timestamp": now - 35 * DAY + 120})
    await service.create_async({"event_name": EVENT, "payload": payload, "timestamp": now + 4 * 60})
    assert local_stripe.total(CUSTOMER, EVENT) == 2


async def test_events_stripe_validates_asynchronously_are_accepted_and_not_counted(local_stripe, make_client):
    client = make_client()
    service = client.v1.billing.meter_events
    sent = {
        "unknown-customer": {"stripe_customer_id": "cus_nobody", "value": "4"},
        "decimal": {"stripe_customer_id": CUSTOMER, "value": "1.5"},
        "not-a-number": {"stripe_customer_id": CUSTOMER, "value": "many"},
        "no-customer": {"value": "4"},
        "no-value": {"stripe_customer_id": CUSTOMER},
    }
    for identifier, payload in sent.items():
        accepted = await service.create_async({"event_name": EVENT, "payload": payload, "identifier": identifier})
        assert accepted.identifier == identifier
    await service.create_async({"event_name": EVENT, "payload": {"stripe_customer_id": CUSTOMER, "value": "-2"}})

    assert {e.identifier: e.error for e in local_stripe.errors()} == {
        "unknown-customer": "meter_event_customer_not_found",
        "decimal": "meter_event_invalid_value",
        "not-a-number": "meter_event_invalid_value",
        "no-customer": "meter_event_no_customer_defined",
        "no-value": "meter_event_value_not_found",
    }
    assert local_stripe.total(CUSTOMER, EVENT) == -2  # negative whole numbers are usage too
    assert local_stripe.total("cus_nobody", EVENT) == 0


async def test_decimal_values_when_enabled_and_unknown_customers_when_auto_created():
    server = await LocalStripe(decimal_values=True, auto_customers=True).start()
    try:
        server.add_meter(EVENT)
        client = stripe.StripeClient(API_KEY, base_addresses={"api": server.url})
        for value in ("1.25", "2"):
            await asyncio.to_thread(
                client.v1.billing.meter_events.create,
                {"event_name": EVENT, "payload": {"stripe_customer_id": "cus_new", "value": value}},
            )
        customer = await asyncio.to_thread(client.v1.customers.retrieve, "cus_new")

        assert server.total("cus_new", EVENT) == Decimal("3.25")
        assert (customer.id, customer.object, customer.livemode) == ("cus_new", "customer", False)
    finally:
        await server.stop()


async def test_a_meter_with_its_own_payload_keys(local_stripe, make_client):
    local_stripe.add_meter("tokens", customer_key="account", value_key="tokens")
    client = make_client()
    params = {"event_name": "tokens", "payload": {"account": CUSTOMER, "tokens": "120"}}

    await client.v1.billing.meter_events.create_async(params)
    await client.v1.billing.meter_events.create_async(
        {"event_name": "tokens", "payload": {"stripe_customer_id": CUSTOMER, "value": "9"}}
    )

    assert local_stripe.total(CUSTOMER, "tokens") == 120
    assert [e.error for e in local_stripe.errors()] == ["meter_event_no_customer_defined"]


# --- authentication and the error shape ---------------------------------------------------------------------


async def test_only_test_secret_and_restricted_keys_are_accepted(local_stripe, make_client):
    for key in ("sk_live_local0123456789abcdef", "pk_test_local0123456789abcdef", "nonsense"):
        with pytest.raises(stripe.AuthenticationError) as refused:
            await send_event(make_client(api_key=key))
        assert refused.value.http_status == 401
        assert refused.value.user_message.startswith("Invalid API Key provided: ")
        assert key not in refused.value.user_message  # masked, as Stripe does
    await send_event(make_client(api_key="rk_test_local0123456789abcdef"))
    assert len(local_stripe.events()) == 1


async def test_raw_answers_have_stripes_shape_and_headers(local_stripe):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{local_stripe.url}/v1/customers/{CUSTOMER}") as no_key:
            assert no_key.status == 401
            assert (await no_key.json())["error"]["message"].startswith("You did not provide an API key.")
        basic = {"Authorization": "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode()}
        async with session.get(f"{local_stripe.url}/v1/customers/{CUSTOMER}", headers=basic) as with_basic:
            assert with_basic.status == 200
        async with session.get(f"{local_stripe.url}/v1/customers/cus_missing", headers=auth) as missing:
            body = await missing.json()
            assert missing.status == 404
            assert missing.content_type == "application/json"
            assert missing.headers["Request-Id"].startswith("req_")
            assert body["error"]["code"] == "resource_missing"
            assert body["error"]["param"] == "id"
            assert body["error"]["message"] == "No such customer: 'cus_missing'"
            assert body["error"]["doc_url"] == "https://stripe.com/docs/error-codes/resource-missing"
            assert missing.headers["Request-Id"] in body["error"]["request_log_url"]
        async with session.get(f"{local_stripe.url}/v1/charges", headers=auth) as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"]["message"].startswith("Unrecognized request URL (GET: /v1/charges)")


# --- faults, retries and idempotency ------------------------------------------------------------------------


async def test_a_rate_limit_is_a_RateLimitError_with_Retry_After_that_the_library_does_not_retry(
    local_stripe, make_client, mode
):
    local_stripe.rate_limit_next(1, retry_after=3)

    with pytest.raises(stripe.RateLimitError) as limited:
        await send_event(make_client(retries=2), mode)

    assert limited.value.http_status == 429
    assert limited.value.code is None  # the library builds RateLimitError without it: read .error.code
    assert error_object(limited.value).code == "rate_limit"
    assert limited.value.headers is not None and limited.value.headers["Retry-After"] == "3"
    assert limited.value.user_message.startswith("Request rate limit exceeded.")
    assert len(meter_event_requests(local_stripe)) == 1
    assert local_stripe.events() == []


async def test_a_lock_timeout_that_says_retry_is_retried_by_the_library(local_stripe, make_client):
    local_stripe.rate_limit_next(1, retry_after=None, code="lock_timeout", should_retry=True)

    await send_event(make_client(retries=2), value="6")

    first, second = meter_event_requests(local_stripe)
    assert (first.status, first.fault, second.status) == (429, "rate_limit", 200)
    assert first.idempotency_key == second.idempotency_key
    assert local_stripe.total(CUSTOMER, EVENT) == 6


async def test_a_500_is_retried_by_the_library_with_the_same_idempotency_key(local_stripe, make_client, mode):
    local_stripe.fail_next(2)

    event = await send_event(make_client(retries=2), mode, value="7", identifier="after-two-500s")

    attempts = meter_event_requests(local_stripe)
    assert [r.status for r in attempts] == [500, 500, 200]
    assert len({r.idempotency_key for r in attempts}) == 1 and attempts[0].idempotency_key
    assert event.identifier == "after-two-500s"
    assert local_stripe.total(CUSTOMER, EVENT) == 7
    assert len(local_stripe.events()) == 1


async def test_without_retries_a_500_is_an_APIError_and_nothing_is_recorded(local_stripe, make_client, mode):
    local_stripe.fail_next(1, status=503)

    with pytest.raises(stripe.APIError) as failed:
        await send_event(make_client(retries=0), mode)

    assert failed.value.http_status == 503
    assert error_object(failed.value).type == "api_error"
    assert "unknown error" in failed.value.user_message
    assert local_stripe.events() == []


async def test_stripe_should_retry_false_stops_the_librarys_retries(local_stripe, make_client):
    local_stripe.fail_next(1, should_retry=False)

    with pytest.raises(stripe.APIError):
        await send_event(make_client(retries=2))

    assert len(meter_event_requests(local_stripe)) == 1


async def test_a_reply_lost_after_recording_then_a_retry_with_the_same_identifier_counts_once(
    local_stripe, make_client, mode
):
    """What the exporter meets when Stripe commits and the answer never arrives: a connection error, and a
    resend (new request, new Idempotency-Key, same identifier) that Stripe refuses as a duplicate."""
    client = make_client(retries=0)
    local_stripe.lose_reply_next(1)

    with pytest.raises(stripe.APIConnectionError) as lost:
        await send_event(client, mode, value="9", identifier="org-7:2026-05:batch-3")
    assert lost.value.should_retry
    assert local_stripe.total(CUSTOMER, EVENT) == 9  # recorded although the client never heard

    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        await send_event(client, mode, value="9", identifier="org-7:2026-05:batch-3")

    assert "already exists with identifier org-7:2026-05:batch-3" in duplicate.value.user_message
    assert local_stripe.total(CUSTOMER, EVENT) == 9
    first, second = meter_event_requests(local_stripe)
    assert (first.status, first.fault, second.status) == (None, "lose_reply", 400)
    assert first.idempotency_key != second.idempotency_key


async def test_the_librarys_own_retry_after_a_lost_reply_is_replayed_not_recorded_again(
    local_stripe, make_client, mode
):
    local_stripe.lose_reply_next(1)

    event = await send_event(make_client(retries=2), mode, value="4", identifier="replayed")

    assert event.identifier == "replayed"
    assert event.last_response.headers["Idempotent-Replayed"] == "true"
    first, second = meter_event_requests(local_stripe)
    assert first.idempotency_key == second.idempotency_key
    assert (first.replayed, second.replayed, second.status) == (False, True, 200)
    assert event.last_response.headers["Original-Request"] == first.request_id
    assert local_stripe.total(CUSTOMER, EVENT) == 4
    assert len(local_stripe.events()) == 1


async def test_an_idempotency_key_reused_with_other_params_is_an_IdempotencyError(local_stripe, make_client, mode):
    client = make_client()
    await send_event(client, mode, value="1", identifier="a", options={"idempotency_key": "export-42"})
    again = await send_event(client, mode, value="1", identifier="a", options={"idempotency_key": "export-42"})
    assert again.last_response.headers["Idempotent-Replayed"] == "true"

    with pytest.raises(stripe.IdempotencyError) as misused:
        await send_event(client, mode, value="2", identifier="b", options={"idempotency_key": "export-42"})

    assert misused.value.http_status == 400
    assert error_object(misused.value).type == "idempotency_error"
    assert "same parameters" in misused.value.user_message
    assert local_stripe.total(CUSTOMER, EVENT) == 1


async def test_a_client_that_gives_up_on_a_slow_request_does_not_undo_it(local_stripe, make_client):
    """The request commits after the client's timeout; the same key meanwhile is 409 in use, afterwards a
    replay; the same identifier under a new key is a duplicate."""
    local_stripe.delay_next(1, seconds=120)
    impatient = make_client(retries=0, timeout=3.0)
    key = {"idempotency_key": "slow-export-1"}

    with pytest.raises(stripe.APIConnectionError):
        await send_event(impatient, value="3", identifier="slow", options=key)

    async def held() -> bool:
        return local_stripe.held == 1

    await eventually(held, within=30, what="the abandoned request to be held")
    assert local_stripe.events() == []

    with pytest.raises(stripe.APIError) as in_use:
        await send_event(make_client(retries=0), value="3", identifier="slow", options=key)
    assert (in_use.value.http_status, error_object(in_use.value).code) == (409, "idempotency_key_in_use")

    local_stripe.release_delays()

    async def recorded() -> bool:
        return len(local_stripe.events()) == 1

    await eventually(recorded, within=30, what="the held request to commit")
    replay = await send_event(make_client(retries=0), value="3", identifier="slow", options=key)
    assert replay.last_response.headers["Idempotent-Replayed"] == "true"
    with pytest.raises(stripe.InvalidRequestError):
        await send_event(make_client(retries=0), value="3", identifier="slow")
    assert local_stripe.total(CUSTOMER, EVENT) == 3


async def test_the_library_retries_a_409_in_use_key_until_the_first_request_finishes(local_stripe, make_client):
    local_stripe.delay_next(1, seconds=120)
    key = {"idempotency_key": "raced"}
    first = asyncio.create_task(send_event(make_client(retries=0), value="2", identifier="raced", options=key))

    async def held() -> bool:
        return local_stripe.held == 1

    await eventually(held, within=30, what="the first request to be held")
    second = asyncio.create_task(send_event(make_client(retries=5), value="2", identifier="raced", options=key))

    async def refused_once() -> bool:
        return any(r.status == 409 for r in meter_event_requests(local_stripe))

    await eventually(refused_once, within=30, what="the concurrent request to be told the key is in use")
    local_stripe.release_delays()
    one, two = await asyncio.gather(first, second)

    assert one.identifier == two.identifier == "raced"
    assert local_stripe.total(CUSTOMER, EVENT) == 2
    assert meter_event_requests(local_stripe)[-1].replayed


# --- meters, customers, subscriptions -----------------------------------------------------------------------


async def test_meters_list_and_retrieve(local_stripe, make_client):
    inactive = local_stripe.add_meter("retired_event", active=False)
    client = make_client()

    listed = await client.v1.billing.meters.list_async({"status": "active"})
    (meter,) = listed.data
    retrieved = await client.v1.billing.meters.retrieve_async(inactive)

    assert (listed.object, listed.url, listed.has_more) == ("list", "/v1/billing/meters", False)
    assert (meter.object, meter.event_name, meter.status, meter.livemode) == ("billing.meter", EVENT, "active", False)
    assert meter.id.startswith("mtr_")
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.value_settings.event_payload_key == "value"
    assert meter.default_aggregation.formula == "sum"
    assert (retrieved.event_name, retrieved.status) == ("retired_event", "inactive")
    with pytest.raises(stripe.InvalidRequestError):
        await send_event(client, event_name="retired_event")
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.billing.meters.retrieve_async("mtr_missing")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


async def test_customer_retrieve_and_resource_missing(local_stripe, make_client, mode):
    customers = make_client().v1.customers

    customer = await call(mode, customers.retrieve_async, customers.retrieve, CUSTOMER)
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await call(mode, customers.retrieve_async, customers.retrieve, "cus_missing")

    assert (customer.id, customer.object, customer.email, customer.name) == (
        CUSTOMER,
        "customer",
        "billing@acme.test",
        "Acme",
    )
    assert customer.livemode is False and customer.metadata.to_dict() == {}
    assert missing.value.http_status == 404
    assert (missing.value.code, missing.value.param) == ("resource_missing", "id")
    assert missing.value.user_message == "No such customer: 'cus_missing'"


PRICE = "price_LocalPro001"


def subscription(sub_id: str, customer: str, status: str, created: int) -> dict:
    """A subscription in Stripe's current (basil and later) shape: billing periods on the items."""
    ended = created + 3600 if status in ("canceled", "incomplete_expired") else None
    item = {
        "id": "si_" + sub_id.removeprefix("sub_"),
        "object": "subscription_item",
        "created": created,
        "current_period_start": created,
        "current_period_end": created + 30 * DAY,
        "metadata": {},
        "price": {"id": PRICE, "object": "price", "active": True, "currency": "usd", "type": "recurring"},
        "quantity": 1,
        "subscription": sub_id,
    }
    return {
        "id": sub_id,
        "object": "subscription",
        "billing_cycle_anchor": created,
        "cancel_at_period_end": False,
        "canceled_at": ended,
        "created": created,
        "currency": "usd",
        "customer": customer,
        "ended_at": ended,
        "items": {
            "object": "list",
            "data": [item],
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
        "livemode": False,
        "metadata": {},
        "start_date": created,
        "status": status,
    }


async def test_subscriptions_retrieve_and_list_by_customer_with_pagination(local_stripe, make_client, mode):
    base = int(time.time()) - 10 * DAY
    for i, status in enumerate(("active", "past_due", "canceled", "trialing")):
        local_stripe.put_subscription(subscription(f"sub_acme{i}", CUSTOMER, status, base + i * 100))
    local_stripe.put_subscription(subscription("sub_other", "cus_Other", "active", base + 50))
    subscriptions = make_client().v1.subscriptions

    async def listing(**params):
        return await call(mode, subscriptions.list_async, subscriptions.list, params)

    first = await listing(customer=CUSTOMER, limit=2)
    second = await listing(customer=CUSTOMER, limit=2, starting_after=first.data[-1].id)
    everything = await listing(customer=CUSTOMER, status="all")
    canceled = await listing(customer=CUSTOMER, status="canceled")
    retrieved = await call(mode, subscriptions.retrieve_async, subscriptions.retrieve, "sub_acme1")

    assert (first.object, first.url, first.has_more) == ("list", "/v1/subscriptions", True)
    assert [s.id for s in first.data] == ["sub_acme3", "sub_acme1"]  # newest first, canceled left out
    assert ([s.id for s in second.data], second.has_more) == (["sub_acme0"], False)
    assert [s.id for s in everything.data] == ["sub_acme3", "sub_acme2", "sub_acme1", "sub_acme0"]
    assert [s.id for s in canceled.data] == ["sub_acme2"]
    assert (retrieved.status, retrieved.customer) == ("past_due", CUSTOMER)
    assert retrieved["items"].data[0].price.id == PRICE
    backwards = await listing(customer=CUSTOMER, limit=1, ending_before="sub_acme0")
    assert ([s.id for s in backwards.data], backwards.has_more) == (["sub_acme1"], True)
    with pytest.raises(stripe.InvalidRequestError) as bad_cursor:
        await listing(customer=CUSTOMER, starting_after="sub_gone")
    assert (bad_cursor.value.code, bad_cursor.value.param) == ("resource_missing", "starting_after")
    with pytest.raises(stripe.InvalidRequestError) as bad_limit:
        await listing(customer=CUSTOMER, limit=101)
    assert bad_limit.value.param == "limit"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await call(mode, subscriptions.retrieve_async, subscriptions.retrieve, "sub_missing")
    assert (missing.value.http_status, missing.value.code, missing.value.user_message) == (
        404,
        "resource_missing",
        "No such subscription: 'sub_missing'",
    )


async def test_auto_paging_walks_every_page(local_stripe, make_client):
    base = int(time.time()) - DAY
    for i in range(25):
        local_stripe.put_subscription(subscription(f"sub_page{i:02}", CUSTOMER, "active", base + i))
    client = make_client()

    page = await asyncio.to_thread(client.v1.subscriptions.list, {"customer": CUSTOMER, "status": "all", "limit": 10})
    ids = await asyncio.to_thread(lambda: [s.id for s in page.auto_paging_iter()])

    assert ids == [f"sub_page{i:02}" for i in reversed(range(25))]
    pages = [r for r in local_stripe.requests if r.path == "/v1/subscriptions"]
    assert [r.params.get("starting_after") for r in pages] == [None, "sub_page15", "sub_page05"]


async def test_the_global_configuration_points_the_library_here_too(local_stripe):
    saved = (stripe.api_key, stripe.api_base, stripe.max_network_retries)
    stripe.api_key, stripe.api_base, stripe.max_network_retries = API_KEY, local_stripe.url, 0
    try:
        customer = await asyncio.to_thread(stripe.Customer.retrieve, CUSTOMER)
        event = await asyncio.to_thread(
            stripe.billing.MeterEvent.create,
            event_name=EVENT,
            payload={"stripe_customer_id": CUSTOMER, "value": "2"},
        )
    finally:
        stripe.api_key, stripe.api_base, stripe.max_network_retries = saved

    assert customer.id == CUSTOMER and event.event_name == EVENT
    assert local_stripe.total(CUSTOMER, EVENT) == 2


# --- as a separate process ----------------------------------------------------------------------------------


async def test_the_standalone_server_serves_is_driven_over_http_and_stops_on_sigterm():
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.stripe_api",
        "--port",
        str(port),
        "--meter",
        EVENT,
        "--meter",
        "other_event",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        ready = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        url = f"http://127.0.0.1:{port}"
        assert ready.decode().strip() == f"local Stripe API on {url}"
        client = stripe.StripeClient(API_KEY, base_addresses={"api": url})
        meters = await asyncio.to_thread(client.v1.billing.meters.list)
        assert sorted(m.event_name for m in meters.data) == sorted([EVENT, "other_event"])

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/_local/customers", json={"id": CUSTOMER}) as created:
                assert created.status == 200
            async with session.post(f"{url}/_local/faults", json={"kind": "fail", "n": 1}) as fault:
                assert fault.status == 200
            params: MeterEventCreateParams = {
                "event_name": EVENT,
                "payload": {"stripe_customer_id": CUSTOMER, "value": "11"},
            }
            with pytest.raises(stripe.APIError):
                await asyncio.to_thread(client.v1.billing.meter_events.create, params)
            await asyncio.to_thread(client.v1.billing.meter_events.create, params)
            query = {"customer": CUSTOMER, "event_name": EVENT}
            async with session.get(f"{url}/_local/totals", params=query) as totals:
                assert (await totals.json()) == {"total": 11}
            async with session.get(f"{url}/_local/events") as events:
                (event,) = (await events.json())["events"]
                assert (event["value"], event["counted"], event["error"]) == (11, True, None)
            async with session.get(f"{url}/_local/requests") as logged:
                statuses = [r["status"] for r in (await logged.json())["requests"] if r["path"] == METER_EVENTS]
                assert statuses == [500, 200]

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = (await process.stderr.read()).decode()
    assert "Traceback" not in stderr, stderr
