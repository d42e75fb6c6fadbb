"""WIRE: the calls the webhook service makes to Stripe's API, through the real `stripe` library. Thin: requests
out, plain values back; what an answer means is exports.py's and sync.py's.

`STRIPE_API_BASE` points the library elsewhere (the tests and `dev` use a local Stripe API). The library's own
retries are off (`max_network_retries=0`): the exporter retries across passes, with the row's identifier and
Idempotency-Key, and counts every attempt, so the library retrying underneath would only hide them. A
restricted key needs Billing meter events (write), Billing meters (read) and Subscriptions (read).
"""

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiohttp
import stripe

from billing_webhooks.usage_export.exports import StripeAnswer
from driftlock_kernel.errors import one_line


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    for key, value in (headers or {}).items():
        if key.lower() == name:
            return value
    return None


def answer_from_error(error: stripe.StripeError) -> StripeAnswer:
    """A refused or failed call as a plain answer: status, Stripe's error type, code and message, and its
    retry hints."""
    body = error.error
    should_retry = _header(error.headers, "stripe-should-retry")
    retry_after = _header(error.headers, "retry-after")
    return StripeAnswer(
        status=error.http_status,
        request_id=error.request_id,
        error_type=getattr(body, "type", None),
        code=getattr(body, "code", None),
        message=error.user_message or one_line(error),
        should_retry=None if should_retry is None else should_retry == "true",
        retry_after=float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None,
    )


class StripeApi:
    """One StripeClient over aiohttp; close() when done."""

    def __init__(self, api_key: str, *, api_base: str, timeout: float):
        self._timeout = timeout
        self._http = stripe.AIOHTTPClient(timeout=timeout)
        self._client = stripe.StripeClient(
            api_key, base_addresses={"api": api_base}, max_network_retries=0, http_client=self._http
        )
        self._meter_ids: dict[str, str] = {}

    async def close(self) -> None:
        await self._http.close_async()

    async def create_meter_event(
        self, *, event_name: str, customer: str, value: int, timestamp: datetime, identifier: str, idempotency_key: str
    ) -> StripeAnswer:
        """POST /v1/billing/meter_events. Never raises: a failure is an answer (status None: no answer)."""
        params: Any = {
            "event_name": event_name,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
            "identifier": identifier,
            "timestamp": int(timestamp.timestamp()),
        }
        try:
            # The library's timeout covers each read; this one the whole call, so a sender never hangs.
            async with asyncio.timeout(self._timeout * 2):
                event = await self._client.v1.billing.meter_events.create_async(
                    params, {"idempotency_key": idempotency_key}
                )
        except stripe.StripeError as error:
            if error.http_status is None:  # APIConnectionError: no answer came
                return StripeAnswer(None, message=f"no answer from Stripe: {one_line(error)}")
            return answer_from_error(error)
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            return StripeAnswer(None, message=f"no answer from Stripe: {type(error).__name__}")
        response = event.last_response
        return StripeAnswer(response.code if response else 200, request_id=response.request_id if response else None)

    async def _meter_id(self, event_name: str) -> str | None:
        if event_name not in self._meter_ids:
            page = await self._client.v1.billing.meters.list_async({"status": "active", "limit": 100})
            async for meter in page.auto_paging_iter():
                self._meter_ids[meter.event_name] = meter.id
        return self._meter_ids.get(event_name)

    async def meter_total(self, event_name: str, customer: str, start: datetime, end: datetime) -> int | None:
        """Stripe's aggregated value of a meter for a customer over whole minutes [start, end); None when no
        active meter has that event name. Raises stripe.StripeError."""
        meter_id = await self._meter_id(event_name)
        if meter_id is None:
            return None
        params: Any = {
            "customer": customer,
            "start_time": int(start.timestamp()),
            "end_time": int(end.timestamp()),
            "limit": 100,
        }
        async with asyncio.timeout(self._timeout * 2):
            summaries = await self._client.v1.billing.meters.event_summaries.list_async(meter_id, params)
        return int(sum(summary.aggregated_value for summary in summaries.data))

    async def customer_subscriptions(self, customer: str) -> list[dict[str, Any]]:
        """Every subscription of a customer, ended ones too, as Stripe renders them. Raises stripe.StripeError."""
        params: Any = {"customer": customer, "status": "all", "limit": 100}
        async with asyncio.timeout(self._timeout * 4):
            page = await self._client.v1.subscriptions.list_async(params)
            return [subscription.to_dict(for_json=True) async for subscription in page.auto_paging_iter()]

    async def subscription(self, subscription_id: str) -> dict[str, Any] | None:
        """One subscription; None when Stripe has none by that id. Raises stripe.StripeError."""
        try:
            async with asyncio.timeout(self._timeout * 2):
                found = await self._client.v1.subscriptions.retrieve_async(subscription_id)
        except stripe.InvalidRequestError as error:
            if error.http_status == 404:
                return None
            raise
        return found.to_dict(for_json=True)
