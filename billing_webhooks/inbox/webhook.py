"""WIRE: `POST /stripe/webhook`. Raw bytes in, a status code out; what an event changes is handlers.py's.

Status-code policy (Stripe retries every answer but a 2xx, for up to three days):

- 413 past 1 MiB; 400 when Stripe-Signature is missing or verifies against none of the configured secrets (or
  is older than 300 s), and when a verified body is not a Stripe event. Retrying would not help.
- 408 when the body has not arrived within `BODY_TIMEOUT_SECONDS`: the route takes no credential, so a client
  may send slowly on purpose; Stripe sends a delivery at once.
- 200 once the event is stored and applied, was stored before (a duplicate), is of a type we ignore, or could
  not be applied for a reason a retry would not fix (unknown organisation, malformed object): it is stored
  with outcome `failed` and its error, for an operator.
- 503 only when the event could not be stored (the database is unreachable or refused the transaction):
  nothing was written, and Stripe's retry applies it.

Storing and applying are one transaction, so an event is either stored and applied, or not stored at all.
"""

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum

import asyncpg
import stripe
from aiohttp import web

from billing_webhooks import metrics
from billing_webhooks.inbox import store
from billing_webhooks.inbox.decisions import EventOutcome, Problem
from billing_webhooks.inbox.events import Envelope, MalformedEvent, envelope, normalize, release_of, type_label
from billing_webhooks.inbox.handlers import Result, handle
from driftlock_kernel import db
from driftlock_kernel.billing import DEFAULT_POLICY, BillingPolicy
from driftlock_kernel.errors import one_line
from driftlock_kernel.keys import redact_keys
from driftlock_kernel.logs import bind_org, bind_request
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
BODY_TIMEOUT_SECONDS = 10.0
SIGNATURE_TOLERANCE_SECONDS = 300
# A transaction that lost a deadlock or serialisation race is run again, this many times in all.
ATTEMPTS = 3


class SignatureFailure(StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    MISMATCH = "mismatch"
    EXPIRED = "expired"


def check_signature(
    payload: str, header: str | None, secrets: Sequence[str], tolerance: int = SIGNATURE_TOLERANCE_SECONDS
) -> SignatureFailure | None:
    """None when the Stripe-Signature header verifies against any of the secrets, else why it does not.

    Several secrets make rotation possible without downtime: Stripe signs with the old and the new secret while
    both are live, and either verifies.
    """
    if not header:
        return SignatureFailure.MISSING
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
            return None
        except stripe.SignatureVerificationError:
            continue
    fields = [item.partition("=") for item in header.split(",")]
    if not any(k.strip() == "t" and v.strip().isdigit() for k, _, v in fields) or not any(
        k.strip() == "v1" for k, _, v in fields
    ):
        return SignatureFailure.MALFORMED
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=None)
            return SignatureFailure.EXPIRED
        except stripe.SignatureVerificationError:
            continue
    return SignatureFailure.MISMATCH


async def read_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The request body, or None when it is longer than `limit` (read no further than one byte past it)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


async def apply_event(conn: db.Connection, event: Envelope, policy: BillingPolicy = DEFAULT_POLICY) -> Result:
    """Normalise and dispatch a stored event. A handler's error (other than the database going away) becomes
    outcome `failed` with the error, and the handler's writes are undone (a savepoint), the event's row kept."""
    try:
        normalized = normalize(event)
    except MalformedEvent as error:
        return Result(
            EventOutcome.FAILED, f"malformed {event.type} event: {error}", problems=(Problem.MALFORMED_EVENT,)
        )
    if normalized is None:
        return Result(EventOutcome.IGNORED, "event type not handled")
    try:
        async with conn.transaction():
            return await handle(conn, normalized, policy)
    except db.UNAVAILABLE_ERRORS:
        raise  # not the event's fault: nothing is stored, and Stripe's retry applies it
    except Exception as error:
        log.exception("stripe event %s (%s): handler failed", event.id, event.type)
        return Result(
            EventOutcome.FAILED, f"{type(error).__name__}: {one_line(error)}", problems=(Problem.HANDLER_ERROR,)
        )


async def store_and_apply(
    pool: asyncpg.Pool, event: Envelope, payload: dict, policy: BillingPolicy = DEFAULT_POLICY, raw: str | None = None
) -> Result:
    """Store the event and apply it in one transaction; EventOutcome.DUPLICATE when its id was stored before
    (unless it was stored as `failed`: then it is applied again, and the new outcome replaces the old).

    Raises one of db.DATABASE_ERRORS when the database could not do it (nothing is then stored).
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                if not await store.insert_event(conn, event, payload, raw):
                    return Result(EventOutcome.DUPLICATE)
                result = await apply_event(conn, event, policy)
                if result.detail:
                    # A detail quotes what the event carried (a malformed org id, say): never a key, if one was
                    # pasted there.
                    result = dataclasses.replace(result, detail=redact_keys(result.detail))
                await store.finish_event(conn, event.id, result.outcome, result.detail, result.org_id)
                return result
        except asyncpg.TransactionRollbackError:
            if attempt == ATTEMPTS:
                raise
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


def error_response(
    request: web.Request, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The service's one error shape (the contract's): `{"error": {"code", "message", "request_id"}}` as JSON."""
    body = {"error": {"code": code, "message": message, "request_id": request.headers.get("x-request-id")}}
    sent = dict(headers or {}) | ({"Retry-After": "1"} if status == 503 else {})
    return web.json_response(body, status=status, headers=sent or None)


class WebhookEndpoint:
    def __init__(
        self,
        secrets: Sequence[str],
        pool_of: Callable[[web.Request], asyncpg.Pool],
        policy: BillingPolicy = DEFAULT_POLICY,
        *,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ):
        if not secrets:
            raise ValueError("at least one webhook secret is required")
        self._secrets = tuple(secrets)
        self._policy = policy
        self._pool_of = pool_of  # request -> pool; the pool lives and dies with the application
        self._body_timeout = body_timeout
        # Refusals cost the sender nothing: one line per reason, then a count a minute (the metric counts all).
        self._refusals = RepeatedLog(log)

    def flush_logs(self) -> None:
        self._refusals.flush()

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        bind_request(request.headers.get("x-request-id"))
        try:
            async with asyncio.timeout(self._body_timeout):
                raw = await read_body(request)
        except TimeoutError:
            metrics.REJECTED.labels(reason="body_timeout").inc()
            self._refusals.info("body_timeout", "refused a delivery: the body did not arrive in time")
            return error_response(request, 408, "request_timeout", "The body did not arrive in time.")
        if raw is None:
            metrics.REJECTED.labels(reason="too_large").inc()
            return error_response(request, 413, "payload_too_large", f"The body is larger than {MAX_BODY_BYTES} bytes.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            metrics.REJECTED.labels(reason="malformed_body").inc()
            return error_response(request, 400, "malformed_body", "The body is not UTF-8.")
        failure = check_signature(text, request.headers.get("Stripe-Signature"), self._secrets)
        if failure is not None:
            metrics.SIGNATURE_FAILURES.labels(reason=failure.value).inc()
            self._refusals.info(failure, "refused a delivery: signature %s", failure.value)
            return error_response(
                request, 400, "invalid_signature", f"Stripe-Signature did not verify ({failure.value})."
            )
        try:
            payload = json.loads(text)
            event = envelope(payload)
        except (ValueError, MalformedEvent) as error:
            metrics.REJECTED.labels(reason="malformed_body").inc()
            reason = str(error) if isinstance(error, MalformedEvent) else "the body is not JSON"
            return error_response(request, 400, "malformed_body", f"Not a Stripe event: {reason}.")

        label = type_label(event.type)
        metrics.API_VERSIONS.labels(release=release_of(event.api_version)).inc()
        try:
            result = await store_and_apply(self._pool_of(request), event, payload, self._policy, raw=text)
        except db.DATABASE_ERRORS as error:
            # Unreachable, or refusing the inbox itself (an unmigrated schema, say): not stored, so Stripe retries.
            metrics.NOT_STORED.inc()
            metrics.HANDLING_DURATION.observe(time.perf_counter() - started)
            log.warning(
                "stripe event %s (%s) not stored, answered 503: %s: %s",
                event.id,
                event.type,
                type(error).__name__,
                one_line(error, 200),
            )
            return error_response(request, 503, "storage_unavailable", "The event could not be stored; retry later.")
        metrics.EVENTS.labels(type=label, outcome=result.outcome.value).inc()
        bind_org(str(result.org_id) if result.org_id else None)
        for problem in result.problems:
            metrics.PROBLEMS.labels(problem=problem.value).inc()
        metrics.HANDLING_DURATION.observe(time.perf_counter() - started)
        level = logging.WARNING if result.problems or result.outcome is EventOutcome.FAILED else logging.INFO
        log.log(
            level,
            "stripe event %s (%s): %s%s%s",
            event.id,
            event.type,
            result.outcome.value,
            f" org={result.org_id}" if result.org_id else "",
            f" ({result.detail})" if result.detail else "",
        )
        return web.json_response(
            {"id": event.id, "outcome": result.outcome.value, "detail": result.detail, "org_id": result.org_id},
            dumps=lambda obj: json.dumps(obj, default=str),
        )
