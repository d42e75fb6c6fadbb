"""A local Stripe API: the few v1 endpoints DriftLock calls, served over real HTTP so that the real `stripe`
library (pointed at it through its API base URL) talks to it exactly as it would to api.stripe.com. Used in
process by the tests (`await LocalStripe().start()`) and as a process by `dev`
(`python -m tests.support.stripe_api --port N [--meter EVENT_NAME ...]`).

Endpoints: `POST /v1/billing/meter_events`, `GET /v1/billing/meters`, `GET /v1/billing/meters/{id}`,
`GET /v1/billing/meters/{id}/event_summaries`, `GET /v1/customers/{id}`, `GET /v1/subscriptions/{id}`,
`GET /v1/subscriptions`, `GET /v1/prices/{id}`. Anything else is Stripe's 404 "Unrecognized request URL".
Under `/_local/` (a prefix no Stripe path uses) is a JSON control surface, unauthenticated and not logged, for
a test that drives the server as a separate process: `POST /_local/meters|customers|subscriptions|prices|faults`,
`DELETE /_local/faults`, `GET /_local/events|totals|requests`.

Faithful to Stripe (its docs, or the library's own code, say so):
- Errors are `{"error": {"type", "message", "code"?, "param"?, "doc_url"?, "request_log_url"}}`; every answer
  carries a `Request-Id: req_…` header. A missing param is 400 `parameter_missing` ("Missing required param:
  X."), an unexpected one 400 `parameter_unknown`, a non-integer 400 `parameter_invalid_integer`, an unknown id
  404 `resource_missing` ("No such customer: 'cus_…'"), an unknown URL 404.
- Authentication is `Authorization: Bearer <key>` (or Basic with the key as user name); without a key, or with
  one that is not a test secret/restricted key (`sk_test_…`, `rk_test_…`; or not the one given to
  `LocalStripe(api_key=…)`), 401.
- Idempotency (docs.stripe.com "Idempotent requests"): a POST's `Idempotency-Key` saves the first response once
  the endpoint has begun executing; the same key with the same params replays it (headers
  `Idempotent-Replayed: true`, `Original-Request`), with other params or on another endpoint it is 400
  `idempotency_error`; a request whose params fail validation saves nothing; keys lapse after 24 h. The library
  sends one key per call and reuses it on its own retries, so a retry after a lost reply is replayed.
- Meter events (docs.stripe.com "Record usage for billing with the API" and "Create a billing meter event"):
  `event_name` and `payload` are required; the payload must carry the meter's customer mapping key (default
  `stripe_customer_id`) and value key (default `value`); `timestamp` defaults to now and must lie within the
  past 35 days and at most 5 minutes ahead; the answer is a `billing.meter_event`; values are whole numbers
  (negative ones too); processing is asynchronous, so summaries are eventually consistent
  (`LocalStripe(summary_delay=…)` makes them lag); summary `start_time`/`end_time` are aligned to minutes,
  start inclusive, end exclusive.
- The library's retries: it retries connection errors, 409 and 5xx, never a 429 unless `Stripe-Should-Retry:
  true`, never anything with `Stripe-Should-Retry: false`; it reads no `Retry-After` (stripe 16.1,
  `_http_client.py`). Stripe's maintainers say real rate limits are not retried, lock timeouts are.

Observed by others against real Stripe, not documented (GitHub, 2025-26; the module's choice follows them):
- A duplicate `identifier` is refused: 400 `invalid_request_error`, no `code`, message "An event already exists
  with identifier <id>.", `Stripe-Should-Retry: false` (langfuse/langfuse#16292 and several codebases that
  match on the message). Uniqueness is enforced over all meters, for exactly 24 h after the first event: Stripe
  promises "at least 24 hours", and a double that forgot sooner or later would hide a client that relies on more.
- An unknown or inactive `event_name` is refused at once: 400, 'No active meter found for event name "X".'
- A timestamp too old is refused at once: 400, "The event timestamp cannot be more than 35 days in past.
  Expected a timestamp greater than or equal to N." The future case's wording is this module's, after it.

Chosen where the docs are silent or only list asynchronous error codes (`v1.billing.meter.error_report_triggered`):
- An unknown customer, a payload without the customer or value key, and a value that is not a whole number are
  accepted (200) and then not counted, as Stripe's asynchronous validation would do; `errors()` and
  `GET /_local/events` show them with the documented codes (`meter_event_customer_not_found`,
  `meter_event_no_customer_defined`, `meter_event_value_not_found`, `meter_event_invalid_value`).
  `auto_customers=True` (`--auto-customers`) instead creates any customer a meter event names, for `dev`.
  `decimal_values=True` accepts decimal values (the docs invite asking Stripe for them).
- No meter is created on first use: `add_meter`, `--meter` or `POST /_local/meters` make one, so that a client
  that names a meter nobody created fails here as it would at Stripe.
- Errors whose exact shape nobody published get no `code`/`param` beyond what the message implies; the
  summary-alignment, limit and in-flight-key (409 `idempotency_key_in_use`) wording is this module's. Every
  4xx but 409 carries `Stripe-Should-Retry: false`, as the observed duplicate refusal did.
- Injected faults (`fail_next`, `rate_limit_next`, `lose_reply_next`, `delay_next`) stand for failures at
  Stripe's edge or in transit: a 500 or 429 is answered before anything executes, so nothing is saved under
  the Idempotency-Key and the library's retry executes afresh. (A 500 from inside Stripe would be replayed.)

Simplified: test mode only (`livemode: false`), one account, in memory; no `expand`, no meter creation or
deactivation over the Stripe API, no meter event adjustments, no `value_grouping_window`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import re
import secrets
import signal
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

DAY = 86400
PAST_WINDOW = 35 * DAY
FUTURE_WINDOW = 5 * 60
IDENTIFIER_WINDOW = DAY
IDEMPOTENCY_WINDOW = DAY
METER_EVENTS = "/v1/billing/meter_events"
CONTROL = "/_local/"
PARAMS = web.RequestKey("params", dict)
REQUEST_ID = web.RequestKey("request_id", str)

_ALNUM = string.ascii_letters + string.digits
_WHOLE = re.compile(r"-?\d+")


def _random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


class StripeError(Exception):
    """An error answer in Stripe's shape; raised by the handlers, rendered by the middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self, request_id: str, now: float) -> dict:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}?t={int(now)}"
        return {"error": error}


def _missing(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def _no_such(kind: str, id_: str, param: str = "id") -> StripeError:
    status = 404 if param == "id" else 400
    return StripeError(status, f"No such {kind}: '{id_}'", code="resource_missing", param=param)


@dataclass(frozen=True)
class Meter:
    id: str
    event_name: str
    display_name: str
    customer_key: str
    value_key: str
    formula: str
    created: int
    active: bool = True

    def to_stripe(self) -> dict:
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {"event_payload_key": self.customer_key, "type": "by_id"},
            "default_aggregation": {"formula": self.formula},
            "display_name": self.display_name,
            "event_name": self.event_name,
            "event_time_window": None,
            "livemode": False,
            "status": "active" if self.active else "inactive",
            "status_transitions": {"deactivated_at": None},
            "updated": self.created,
            "value_settings": {"event_payload_key": self.value_key},
        }


@dataclass(frozen=True)
class MeterEvent:
    """An accepted meter event. `error` is the code Stripe's asynchronous validation would report for it, in
    which case it counts towards nothing."""

    identifier: str
    event_name: str
    meter_id: str
    customer: str | None
    value: int | Decimal | None
    timestamp: int
    created: float
    payload: dict[str, str]
    request_id: str
    error: str | None = None
    error_message: str | None = None

    @property
    def counted(self) -> bool:
        return self.error is None

    def to_stripe(self) -> dict:
        return {
            "object": "billing.meter_event",
            "created": int(self.created),
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": self.timestamp,
        }


@dataclass(frozen=True)
class RequestRecord:
    """One request that reached the Stripe endpoints, logged when it finished (control requests are not kept).
    `status` is None when the reply was deliberately lost; `fault` names the injected fault that shaped it."""

    method: str
    path: str
    params: dict
    status: int | None
    request_id: str
    idempotency_key: str | None
    replayed: bool
    fault: str | None


@dataclass
class _Fault:
    kind: str  # fail, rate_limit, lose_reply, delay
    remaining: int
    method: str | None
    path: str
    status: int = 500
    retry_after: int | None = None
    code: str | None = None
    should_retry: bool | None = None
    seconds: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and (self.method is None or self.method == method) and path.startswith(self.path)


@dataclass
class _Saved:
    """What an Idempotency-Key stands for: the request it first came with and, once finished, its answer."""

    method: str
    path: str
    params: dict
    saved_at: float
    status: int | None = None  # None while the first request is still executing
    body: bytes = b""
    request_id: str = ""


def decode_params(pairs) -> dict:
    """Stripe's form encoding (`payload[value]=5`, `expand[0]=x`) into nested dicts and lists."""
    root: dict = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        parts = [head] + (rest[:-1].split("][") if rest else [])
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise StripeError(400, f"Invalid object for {key}", param=head)
    return _listify(root)


def _listify(node):
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def _integer(params: dict, name: str) -> int | None:
    if name not in params:
        return None
    value = params[name]
    if not isinstance(value, str) or not _WHOLE.fullmatch(value.strip()):
        raise StripeError(400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=name)
    return int(value)


def _only(params: dict, allowed: set[str]) -> None:
    for name in params:
        if name not in allowed:
            raise StripeError(400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name)


def _masked(key: str) -> str:
    prefix = key[: key.find("_", key.find("_") + 1) + 1] if key.count("_") >= 2 else ""
    return prefix + "*" * max(len(key) - len(prefix) - 4, 0) + key[-4:]


class LocalStripe:
    """The server and its in-memory account. Not thread-safe: call it from the loop that serves it."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        clock: Callable[[], float] = time.time,
        summary_delay: float = 0.0,
        decimal_values: bool = False,
        auto_customers: bool = False,
    ):
        self.api_key = api_key
        self.summary_delay = summary_delay
        self.decimal_values = decimal_values
        self.auto_customers = auto_customers
        self._clock = clock
        self._offset = 0.0
        self._meters: dict[str, Meter] = {}
        self._customers: dict[str, dict] = {}
        self._subscriptions: dict[str, dict] = {}
        self._prices: dict[str, dict] = {}
        self._events: list[MeterEvent] = []
        self._identifiers: dict[str, float] = {}
        self._saved: dict[str, _Saved] = {}
        self._faults: list[_Fault] = []
        self._release = asyncio.Event()
        self._requests: list[RequestRecord] = []
        self.held = 0  # requests a delay fault is holding right now
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # --- serving ------------------------------------------------------------------------------------------

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> LocalStripe:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(
            [
                web.post(METER_EVENTS, self._create_meter_event),
                web.get("/v1/billing/meters", self._list_meters),
                web.get("/v1/billing/meters/{id}", self._retrieve_meter),
                web.get("/v1/billing/meters/{id}/event_summaries", self._event_summaries),
                web.get("/v1/customers/{id}", self._retrieve_customer),
                web.get("/v1/subscriptions", self._list_subscriptions),
                web.get("/v1/subscriptions/{id}", self._retrieve_subscription),
                web.get("/v1/prices/{id}", self._retrieve_price),
                web.post(CONTROL + "meters", self._control_meters),
                web.post(CONTROL + "customers", self._control_customers),
                web.post(CONTROL + "subscriptions", self._control_subscriptions),
                web.post(CONTROL + "prices", self._control_prices),
                web.post(CONTROL + "faults", self._control_add_fault),
                web.delete(CONTROL + "faults", self._control_clear_faults),
                web.get(CONTROL + "events", self._control_events),
                web.get(CONTROL + "totals", self._control_totals),
                web.get(CONTROL + "requests", self._control_requests),
            ]
        )
        # A client that gives up must not stop a request that already began: at Stripe it would still commit.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host, self.port = host, self._runner.addresses[0][1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- state --------------------------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move this server's clock (timestamp windows, identifier and idempotency lapses, summary lag)."""
        self._offset += seconds

    def add_meter(
        self,
        event_name: str,
        *,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        formula: str = "sum",
        display_name: str | None = None,
        active: bool = True,
    ) -> str:
        if formula not in ("sum", "count", "last"):
            raise ValueError(f"unknown aggregation formula {formula!r}")
        if any(m.event_name == event_name and m.active for m in self._meters.values()):
            raise ValueError(f"an active meter already has event_name {event_name!r}")
        meter = Meter(
            id=_random_id("mtr_test_"),
            event_name=event_name,
            display_name=display_name or event_name,
            customer_key=customer_key,
            value_key=value_key,
            formula=formula,
            created=int(self.now()),
            active=active,
        )
        self._meters[meter.id] = meter
        return meter.id

    def put_customer(self, id: str | None = None, **fields: Any) -> dict:
        """Create or replace a customer; `fields` override the defaults of a new test-mode customer."""
        customer_id = id or _random_id("cus_", 14)
        customer: dict[str, Any] = {
            "id": customer_id,
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": int(self.now()),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": None,
            "discount": None,
            "email": None,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": {},
            "name": None,
            "next_invoice_sequence": 1,
            "phone": None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        customer.update(copy.deepcopy(fields))
        self._customers[customer_id] = customer
        return copy.deepcopy(customer)

    def put_subscription(self, obj: dict) -> dict:
        """Store a Stripe-shaped subscription as given (it needs `id` and `customer`); served as stored."""
        if not str(obj.get("id", "")).startswith("sub_") or not obj.get("customer"):
            raise ValueError("a subscription needs an id 'sub_…' and a customer")
        self._subscriptions[obj["id"]] = copy.deepcopy(obj)
        return copy.deepcopy(obj)

    def put_price(self, id: str, *, active: bool = True, **fields: Any) -> dict:
        """Create or replace a recurring test-mode price; `fields` override the defaults."""
        price = {
            "id": id,
            "object": "price",
            "active": active,
            "billing_scheme": "per_unit",
            "created": int(self.now()),
            "currency": "usd",
            "livemode": False,
            "lookup_key": None,
            "metadata": {},
            "nickname": None,
            "product": "prod_" + id.removeprefix("price_"),
            "recurring": {"interval": "month", "interval_count": 1, "meter": None, "usage_type": "licensed"},
            "type": "recurring",
            "unit_amount": 1000,
        }
        price.update(copy.deepcopy(fields))
        self._prices[id] = price
        return copy.deepcopy(price)

    # --- inspection ---------------------------------------------------------------------------------------

    def events(self, customer_id: str | None = None, event_name: str | None = None) -> list[MeterEvent]:
        """Every accepted meter event, counted or not, oldest first."""
        return [
            e
            for e in self._events
            if (customer_id is None or e.customer == customer_id) and (event_name is None or e.event_name == event_name)
        ]

    def errors(self) -> list[MeterEvent]:
        """Accepted events that Stripe's asynchronous validation would reject (and so counts for nothing)."""
        return [e for e in self._events if not e.counted]

    def total(
        self, customer_id: str, event_name: str, start: int | None = None, end: int | None = None
    ) -> int | Decimal:
        """Sum of the counted values of accepted events, timestamp in [start, end); int unless decimals were."""
        values = [
            e.value or 0
            for e in self.events(customer_id, event_name)
            if e.counted and (start is None or e.timestamp >= start) and (end is None or e.timestamp < end)
        ]
        total = sum((Decimal(value) for value in values), Decimal(0))
        return int(total) if total == total.to_integral_value() else total

    @property
    def requests(self) -> list[RequestRecord]:
        return list(self._requests)

    # --- faults -------------------------------------------------------------------------------------------
    # Each applies to the next `n` requests whose method is `method` (None: any) and whose path starts with
    # `path`; by default, meter event creation.

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        should_retry: bool | None = None,
        method: str | None = "POST",
        path: str = METER_EVENTS,
    ) -> None:
        """Answer with Stripe's `api_error`, before anything is executed or recorded."""
        self._faults.append(_Fault("fail", n, method, path, status=status, should_retry=should_retry))

    def rate_limit_next(
        self,
        n: int = 1,
        retry_after: int | None = 1,
        *,
        code: str = "rate_limit",
        should_retry: bool | None = None,
        method: str | None = "POST",
        path: str = METER_EVENTS,
    ) -> None:
        """Answer 429 (`code` rate_limit, or lock_timeout), nothing recorded."""
        self._faults.append(
            _Fault(
                "rate_limit", n, method, path, status=429, retry_after=retry_after, code=code, should_retry=should_retry
            )
        )

    def lose_reply_next(self, n: int = 1, *, method: str | None = "POST", path: str = METER_EVENTS) -> None:
        """Execute the request (the event is recorded, its idempotent answer saved), then close the connection
        without answering: what a timeout after the commit looks like to the client."""
        self._faults.append(_Fault("lose_reply", n, method, path))

    def delay_next(self, n: int, seconds: float, *, method: str | None = "POST", path: str = METER_EVENTS) -> None:
        """Hold the request `seconds` (or until `release_delays()`) once it has taken its idempotency key and
        before it executes: a concurrent request with that key gets 409, a client that gives up meanwhile does
        not stop it. `held` counts the requests held now."""
        self._release.clear()
        self._faults.append(_Fault("delay", n, method, path, seconds=seconds))

    def release_delays(self) -> None:
        self._release.set()

    def clear_faults(self) -> None:
        self._faults.clear()
        self._release.set()

    def _take_fault(self, kinds: tuple[str, ...], method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.kind in kinds and fault.matches(method, path):
                fault.remaining -= 1
                return fault
        return None

    # --- the request path ---------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL):
            return await handler(request)
        request_id = _random_id("req_", 14)
        method, path = request.method, request.path
        idempotency_key = request.headers.get("Idempotency-Key") if method == "POST" else None
        request[REQUEST_ID] = request_id
        record: dict[str, Any] = {"status": None, "replayed": False, "fault": None, "params": {}}
        try:
            try:
                params = await self._params(request)
                record["params"] = params
                response = await self._answer(request, handler, params, idempotency_key, request_id, record)
            except StripeError as error:
                response = self._error_response(error, request_id)
            if record["fault"] == "lose_reply":
                # Close the socket before a byte of the answer is written: aiohttp's write then fails with a
                # ConnectionError, which it treats as a client that went away.
                if request.transport is not None:
                    request.transport.close()
                return response
            record["status"] = response.status
            response.headers["Request-Id"] = request_id
            if "Stripe-Version" in request.headers:
                response.headers["Stripe-Version"] = request.headers["Stripe-Version"]
            return response
        finally:
            self._requests.append(
                RequestRecord(
                    method=method,
                    path=path,
                    params=record["params"],
                    status=record["status"],
                    request_id=request_id,
                    idempotency_key=idempotency_key,
                    replayed=record["replayed"],
                    fault=record["fault"],
                )
            )

    async def _answer(self, request, handler, params, idempotency_key, request_id, record) -> web.StreamResponse:
        method, path = request.method, request.path
        fault = self._take_fault(("fail", "rate_limit", "lose_reply"), method, path)
        if fault is not None:
            record["fault"] = fault.kind
            if fault.kind != "lose_reply":
                raise self._fault_error(fault)  # an edge failure: nothing below runs, nothing is saved
        self._authenticate(request)
        if idempotency_key:
            replay = self._replay(idempotency_key, method, path, params, request_id)
            if replay is not None:
                record["replayed"] = True
                return replay
        try:
            # Held after the key is taken and before the commit: a slow execution, which a concurrent request
            # with the same key finds in progress and a client that gives up does not undo.
            delay = self._take_fault(("delay",), method, path)
            if delay is not None:
                record["fault"] = record["fault"] or "delay"
                self.held += 1
                try:
                    await asyncio.wait_for(self._release.wait(), delay.seconds)
                except TimeoutError:
                    pass
                finally:
                    self.held -= 1
            response = await self._route(request, handler, params)
        except BaseException:
            self._saved.pop(idempotency_key or "", None)
            raise
        if idempotency_key:
            if 200 <= response.status < 300:
                saved = self._saved[idempotency_key]
                assert isinstance(response.body, bytes)  # every answer is built by _json, from text
                saved.status, saved.body, saved.request_id = response.status, response.body, request_id
            else:
                self._saved.pop(idempotency_key, None)
        return response

    async def _route(self, request, handler, params) -> web.Response:
        request[PARAMS] = params
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            raise StripeError(
                404,
                f"Unrecognized request URL ({request.method}: {request.path}). Please see https://stripe.com/docs "
                "or we can help at https://support.stripe.com/.",
            ) from None

    async def _params(self, request: web.Request) -> dict:
        if request.method == "POST":
            body = await request.text()
            return decode_params(parse_qsl(body, keep_blank_values=True))
        return decode_params(request.query.items())

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(credentials).decode().partition(":")[0]
            except ValueError:
                key = credentials
        if not key:
            raise StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization header, "
                "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
                "https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.",
            )
        valid = key == self.api_key if self.api_key else key.startswith(("sk_test_", "rk_test_"))
        if not valid:
            raise StripeError(401, f"Invalid API Key provided: {_masked(key)}")

    def _replay(self, key: str, method: str, path: str, params: dict, request_id: str) -> web.Response | None:
        """The saved answer for a repeated key, an error for a misused one, or None to execute (and save)."""
        now = self.now()
        saved = self._saved.get(key)
        if saved is not None and now - saved.saved_at > IDEMPOTENCY_WINDOW and saved.status is not None:
            saved = None
        if saved is None:
            self._saved[key] = _Saved(method, path, params, now)
            return None
        try_other = f"Try using a key other than '{key}' if you meant to execute a different request."
        if (saved.method, saved.path) != (method, path):
            raise StripeError(
                400,
                "Keys for idempotent requests can only be used for the same endpoint they were first used for "
                f"('{saved.method} {saved.path}' vs '{method} {path}'). {try_other}",
                type="idempotency_error",
            )
        if saved.params != params:
            raise StripeError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they were first used "
                f"with. {try_other}",
                type="idempotency_error",
            )
        if saved.status is None:
            raise StripeError(
                409,
                "There is currently another in-progress request using this idempotency key. Retry this request "
                "once the other one has finished.",
                code="idempotency_key_in_use",
                headers={"Stripe-Should-Retry": "true"},
            )
        response = web.Response(status=saved.status, body=saved.body, content_type="application/json")
        response.headers["Idempotent-Replayed"] = "true"
        response.headers["Original-Request"] = saved.request_id
        return response

    def _fault_error(self, fault: _Fault) -> StripeError:
        headers = {}
        if fault.should_retry is not None:
            headers["Stripe-Should-Retry"] = "true" if fault.should_retry else "false"
        if fault.kind == "rate_limit":
            if fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
            message = (
                "This object cannot be accessed right now because another API request or Stripe process is "
                "currently accessing it. If you see this error intermittently, retry the request."
                if fault.code == "lock_timeout"
                else "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits."
            )
            return StripeError(429, message, code=fault.code, headers=headers)
        return StripeError(
            fault.status,
            "An unknown error occurred (injected by the local Stripe API).",
            type="api_error",
            headers=headers,
        )

    def _error_response(self, error: StripeError, request_id: str) -> web.Response:
        headers = dict(error.headers)
        if 400 <= error.status < 500 and error.status != 409:
            headers.setdefault("Stripe-Should-Retry", "false")
        return self._json(error.body(request_id, self.now()), status=error.status, headers=headers)

    @staticmethod
    def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=status,
            text=json.dumps(obj, indent=2, default=_json_default),
            content_type="application/json",
            headers=headers,
        )

    # --- Stripe endpoints ---------------------------------------------------------------------------------

    async def _create_meter_event(self, request: web.Request) -> web.Response:
        params = request[PARAMS]
        _only(params, {"event_name", "payload", "identifier", "timestamp", "expand"})
        event_name = params.get("event_name")
        if not event_name:
            raise _missing("event_name")
        payload = params.get("payload")
        if payload is None or payload == "":
            raise _missing("payload")
        if not isinstance(payload, dict) or any(not isinstance(v, str) for v in payload.values()):
            raise StripeError(400, "Invalid object", param="payload")
        now = self.now()
        timestamp = _integer(params, "timestamp")
        if timestamp is None:
            timestamp = int(now)
        elif timestamp < now - PAST_WINDOW:
            raise StripeError(
                400,
                "The event timestamp cannot be more than 35 days in past. Expected a timestamp greater than or "
                f"equal to {int(now - PAST_WINDOW)}.",
            )
        elif timestamp > now + FUTURE_WINDOW:
            raise StripeError(
                400,
                "The event timestamp cannot be more than 5 minutes in the future. Expected a timestamp less than "
                f"or equal to {int(now + FUTURE_WINDOW)}.",
            )
        meter = next((m for m in self._meters.values() if m.event_name == event_name and m.active), None)
        if meter is None:
            raise StripeError(400, f'No active meter found for event name "{event_name}".')
        identifier = params.get("identifier") or str(uuid.uuid4())
        first_seen = self._identifiers.get(identifier)
        if first_seen is not None and now - first_seen <= IDENTIFIER_WINDOW:
            raise StripeError(400, f"An event already exists with identifier {identifier}.")
        self._identifiers[identifier] = now
        event = self._validated_event(meter, identifier, timestamp, now, payload, request[REQUEST_ID])
        self._events.append(event)
        return self._json(event.to_stripe())

    def _validated_event(self, meter: Meter, identifier, timestamp, now, payload, request_id) -> MeterEvent:
        """The event as Stripe's asynchronous validation would leave it: counted, or carrying its error code."""
        customer = payload.get(meter.customer_key) or None
        raw = payload.get(meter.value_key)
        value = 1 if meter.formula == "count" else (self._value(raw) if raw is not None else None)
        error, message = self._async_error(meter, customer, raw, value)
        if error is None and customer not in self._customers:
            self.put_customer(customer)  # auto_customers: the customer exists from its first event on
        return MeterEvent(
            identifier=identifier,
            event_name=meter.event_name,
            meter_id=meter.id,
            customer=customer,
            value=value,
            timestamp=timestamp,
            created=now,
            payload=dict(payload),
            request_id=request_id,
            error=error,
            error_message=message,
        )

    def _async_error(self, meter: Meter, customer, raw, value) -> tuple[str | None, str | None]:
        if customer is None:
            return "meter_event_no_customer_defined", f"Customer mapping key {meter.customer_key} not found in payload."
        if customer not in self._customers and not self.auto_customers:
            return "meter_event_customer_not_found", f"No customer found with id {customer}."
        if meter.formula == "count":
            return None, None
        if raw is None:
            return "meter_event_value_not_found", f"Value key {meter.value_key} not found in payload."
        if value is None:
            return "meter_event_invalid_value", f"Value {raw!r} is not a valid number for this meter."
        return None, None

    def _value(self, raw: str) -> int | Decimal | None:
        text = raw.strip()
        if _WHOLE.fullmatch(text):
            return int(text)
        if not self.decimal_values:
            return None
        try:
            value = Decimal(text)
        except InvalidOperation:
            return None
        return value if value.is_finite() else None

    async def _list_meters(self, request: web.Request) -> web.Response:
        params = request[PARAMS]
        _only(params, {"status", "limit", "starting_after", "ending_before", "expand"})
        status = params.get("status")
        meters = [m.to_stripe() for m in self._meters.values() if status is None or m.to_stripe()["status"] == status]
        return self._json(self._page(meters, params, "/v1/billing/meters", "billing meter"))

    def _meter(self, meter_id: str) -> Meter:
        meter = self._meters.get(meter_id)
        if meter is None:
            raise _no_such("billing meter", meter_id)
        return meter

    async def _retrieve_meter(self, request: web.Request) -> web.Response:
        _only(request[PARAMS], {"expand"})
        return self._json(self._meter(request.match_info["id"]).to_stripe())

    async def _event_summaries(self, request: web.Request) -> web.Response:
        params = request[PARAMS]
        meter = self._meter(request.match_info["id"])
        if "value_grouping_window" in params:
            raise StripeError(400, "value_grouping_window is not supported by the local Stripe API.")
        _only(params, {"customer", "start_time", "end_time", "limit", "starting_after", "ending_before", "expand"})
        customer = params.get("customer")
        if not customer:
            raise _missing("customer")
        bounds = {}
        for name in ("start_time", "end_time"):
            value = _integer(params, name)
            if value is None:
                raise _missing(name)
            if value % 60:
                raise StripeError(400, f"{name} must be aligned with minute boundaries.", param=name)
            bounds[name] = value
        start, end = bounds["start_time"], bounds["end_time"]
        if end <= start:
            raise StripeError(400, "end_time must be after start_time.", param="end_time")
        visible_before = self.now() - self.summary_delay
        events = [
            e
            for e in self._events
            if e.meter_id == meter.id
            and e.customer == customer
            and e.counted
            and e.created <= visible_before
            and start <= e.timestamp < end
        ]
        summary = {
            "id": _random_id("mtrusg_test_"),
            "object": "billing.meter_event_summary",
            "aggregated_value": _aggregate(meter.formula, events),
            "end_time": end,
            "livemode": False,
            "meter": meter.id,
            "start_time": start,
        }
        url = f"/v1/billing/meters/{meter.id}/event_summaries"
        return self._json({"object": "list", "data": [summary], "has_more": False, "url": url})

    async def _retrieve_customer(self, request: web.Request) -> web.Response:
        _only(request[PARAMS], {"expand"})
        customer = self._customers.get(request.match_info["id"])
        if customer is None:
            raise _no_such("customer", request.match_info["id"])
        return self._json(customer)

    async def _retrieve_price(self, request: web.Request) -> web.Response:
        _only(request[PARAMS], {"expand"})
        price = self._prices.get(request.match_info["id"])
        if price is None:
            raise _no_such("price", request.match_info["id"])
        return self._json(price)

    async def _retrieve_subscription(self, request: web.Request) -> web.Response:
        _only(request[PARAMS], {"expand"})
        subscription = self._subscriptions.get(request.match_info["id"])
        if subscription is None:
            raise _no_such("subscription", request.match_info["id"])
        return self._json(subscription)

    async def _list_subscriptions(self, request: web.Request) -> web.Response:
        params = request[PARAMS]
        _only(params, {"customer", "status", "price", "limit", "starting_after", "ending_before", "expand"})
        status = params.get("status")
        customer, price = params.get("customer"), params.get("price")

        def wanted(sub: dict) -> bool:
            if customer is not None and sub.get("customer") != customer:
                return False
            if price is not None and price not in _price_ids(sub):
                return False
            if status == "all":
                return True
            if status == "ended":
                return sub.get("status") in ("canceled", "incomplete_expired")
            if status is None:
                return sub.get("status") != "canceled"
            return sub.get("status") == status

        subscriptions = [s for s in self._subscriptions.values() if wanted(s)]
        return self._json(self._page(subscriptions, params, "/v1/subscriptions", "subscription"))

    def _page(self, objects: list[dict], params: dict, url: str, kind: str) -> dict:
        """Stripe's list object: newest first, `limit` (1-100, default 10), `starting_after`/`ending_before`."""
        limit = _integer(params, "limit")
        limit = 10 if limit is None else limit
        if not 1 <= limit <= 100:
            raise StripeError(400, "Invalid limit: must be between 1 and 100.", param="limit")
        # Stable newest-first: by `created`, later insertions first among equals.
        ordered = [o for _, o in sorted(enumerate(objects), key=lambda p: (p[1].get("created", 0), p[0]), reverse=True)]
        ids = [o["id"] for o in ordered]
        after, before = params.get("starting_after"), params.get("ending_before")
        if after is not None:
            if after not in ids:
                raise _no_such(kind, after, "starting_after")
            window = ordered[ids.index(after) + 1 :]
            data, has_more = window[:limit], len(window) > limit
        elif before is not None:
            if before not in ids:
                raise _no_such(kind, before, "ending_before")
            window = ordered[: ids.index(before)]
            data, has_more = window[-limit:], len(window) > limit
        else:
            data, has_more = ordered[:limit], len(ordered) > limit
        return {"object": "list", "data": copy.deepcopy(data), "has_more": has_more, "url": url}

    # --- control surface (JSON, for a server run as a process) --------------------------------------------

    async def _control_meters(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            meter_id = self.add_meter(
                body["event_name"],
                customer_key=body.get("customer_key", "stripe_customer_id"),
                value_key=body.get("value_key", "value"),
                formula=body.get("formula", "sum"),
                display_name=body.get("display_name"),
            )
        except (KeyError, ValueError) as error:
            return self._json({"error": str(error)}, status=400)
        return self._json(self._meters[meter_id].to_stripe())

    async def _control_customers(self, request: web.Request) -> web.Response:
        body = await request.json()
        return self._json(self.put_customer(body.pop("id", None), **body))

    async def _control_prices(self, request: web.Request) -> web.Response:
        body = await request.json()
        return self._json(self.put_price(body.pop("id"), **body))

    async def _control_subscriptions(self, request: web.Request) -> web.Response:
        try:
            return self._json(self.put_subscription(await request.json()))
        except ValueError as error:
            return self._json({"error": str(error)}, status=400)

    async def _control_add_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        where = {"method": body.get("method", "POST"), "path": body.get("path", METER_EVENTS)}
        n = int(body.get("n", 1))
        kind = body.get("kind")
        if kind == "fail":
            self.fail_next(n, int(body.get("status", 500)), should_retry=body.get("should_retry"), **where)
        elif kind == "rate_limit":
            self.rate_limit_next(
                n,
                body.get("retry_after", 1),
                code=body.get("code", "rate_limit"),
                should_retry=body.get("should_retry"),
                **where,
            )
        elif kind == "lose_reply":
            self.lose_reply_next(n, **where)
        elif kind == "delay":
            self.delay_next(n, float(body["seconds"]), **where)
        else:
            return self._json({"error": f"unknown fault kind {kind!r}"}, status=400)
        return self._json({"ok": True})

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return self._json({"ok": True})

    async def _control_events(self, request: web.Request) -> web.Response:
        events = self.events(request.query.get("customer"), request.query.get("event_name"))
        return self._json({"events": [asdict(e) | {"counted": e.counted} for e in events]})

    async def _control_totals(self, request: web.Request) -> web.Response:
        query = request.query
        start, end = query.get("start"), query.get("end")
        total = self.total(
            query["customer"], query["event_name"], int(start) if start else None, int(end) if end else None
        )
        return self._json({"total": total})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return self._json({"requests": [asdict(r) for r in self._requests]})


def _aggregate(formula: str, events: list[MeterEvent]) -> int | float:
    if formula == "count":
        return len(events)
    if formula == "last":
        latest = max(events, key=lambda e: (e.timestamp, e.created), default=None)
        value = latest.value if latest is not None else 0
    else:
        value = sum((e.value or 0 for e in events), Decimal(0))
    value = Decimal(value or 0)
    return int(value) if value == value.to_integral_value() else float(value)


def _price_ids(subscription: dict) -> set[str]:
    items = (subscription.get("items") or {}).get("data") or []
    return {price_id for item in items if (price_id := (item.get("price") or {}).get("id")) is not None}


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


async def _serve(args: argparse.Namespace) -> None:
    server = LocalStripe(api_key=args.api_key, auto_customers=args.auto_customers)
    for event_name in args.meter:
        server.add_meter(event_name)
    for price_id in args.price:
        server.put_price(price_id)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start(args.port, args.host)
    print(f"local Stripe API on {server.url}", flush=True)
    await stopping.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.stripe_api", description="Serve a local Stripe API (test mode, in memory)."
    )
    parser.add_argument("--port", type=int, default=12111, help="port to listen on (0: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--meter", action="append", default=[], metavar="EVENT_NAME", help="create an active meter (repeatable)"
    )
    parser.add_argument(
        "--price", action="append", default=[], metavar="PRICE_ID", help="create an active price (repeatable)"
    )
    parser.add_argument("--api-key", help="accept only this key (default: any sk_test_… or rk_test_… key)")
    parser.add_argument(
        "--auto-customers", action="store_true", help="treat every customer a meter event names as existing"
    )
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
