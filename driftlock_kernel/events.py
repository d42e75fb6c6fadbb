"""Events to the product: the catalogue, the Standard Webhooks format, the address policy for customers' URLs,
and writing an event (driftlock.emit_event, in the caller's transaction).

Standard Webhooks (standardwebhooks.com): a POST of `{"type","timestamp","data"}` with headers `webhook-id`
(the event's id, the same on every retry), `webhook-timestamp` (Unix seconds of the attempt) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with the base64-decoded part of
a `whsec_…` secret. docs/events.md shows receivers in Go, Python and Node.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from driftlock_kernel import db
from driftlock_kernel.jsonfmt import iso, to_json

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
# Standard Webhooks' own lower bound for a key.
MIN_SECRET_KEY_BYTES = 24


class EventType(StrEnum):
    """The catalogue (CONTRACT.md, "Events to the product")."""

    USAGE_THRESHOLD_REACHED = "usage.threshold_reached"
    USAGE_SPEND_CAP_REACHED = "usage.spend_cap_reached"
    BILLING_PAYMENT_FAILED = "billing.payment_failed"
    BILLING_SERVICE_RESTRICTED = "billing.service_restricted"
    BILLING_PAYMENT_RECOVERED = "billing.payment_recovered"
    BILLING_PLAN_CHANGED = "billing.plan_changed"
    BILLING_TRIAL_WILL_END = "billing.trial_will_end"
    KEY_EXPIRING = "key.expiring"
    KEY_REVOKED = "key.revoked"
    KEY_ROLLED = "key.rolled"
    ORG_SUSPENDED = "org.suspended"
    ORG_RESUMED = "org.resumed"
    # Not in a customer's catalogue: the test an endpoint's owner asks for, and what the operator is told.
    ENDPOINT_TEST = "event_endpoint.test"
    ENDPOINT_DISABLED = "event_endpoint.disabled"


SUBSCRIBABLE = frozenset(t.value for t in EventType if t is not EventType.ENDPOINT_DISABLED)


def parse_event_types(names: Iterable[str]) -> tuple[str, ...]:
    """The types an endpoint subscribes to (empty: every type); ValueError naming an unknown one."""
    chosen = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in chosen if name not in SUBSCRIBABLE]
    if unknown:
        raise ValueError(f"unknown event type {unknown[0]!r}; known: {', '.join(sorted(SUBSCRIBABLE))}")
    return chosen


# --- the format and its signature ---------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: the base64-decoded part after `whsec_`. A secret in another shape (the deprecated
    DRIFTLOCK_ALERT_WEBHOOK_SECRET) is used as its UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    return secret.encode()


def check_secret(secret: str) -> str:
    """A `whsec_` secret with a key long enough; ValueError otherwise."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("the secret must start with whsec_ (then base64)")
    if len(secret_key(secret)) < MIN_SECRET_KEY_BYTES:
        raise ValueError(f"the secret's key must be at least {MIN_SECRET_KEY_BYTES} bytes")
    return secret


def sign(keys: Iterable[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: one `v1,<base64>` per key, space-separated (several while one rotates)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)


def body(event_type: str, occurred_at: datetime, data: Mapping[str, Any]) -> bytes:
    return to_json({"type": event_type, "timestamp": iso(occurred_at), "data": data}).encode()


def headers(keys: Iterable[bytes], message_id: str, timestamp: int, payload: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(keys, message_id, timestamp, payload),
    }


# --- where a customer's events may go -----------------------------------------------------------------------

# Cloud metadata services: never, whatever DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS says.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
MAX_URL_LENGTH = 2000


class UrlRefused(ValueError):
    """A URL events may not be sent to; the message says why, in one line."""


def check_url_shape(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL with a host and no credentials; UrlRefused otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UrlRefused(f"not a URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("only http and https URLs receive events")
    if not parts.hostname:
        raise UrlRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("the URL may not carry credentials; events are signed instead")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def address_refusal(address: str, *, allow_private: bool) -> str | None:
    """Why events may not go to this IP address, or None when they may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if allow_private:
        return None
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return f"{ip} is a private or reserved address"
    return None


async def resolve_allowed(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Every address `host` resolves to, refused (UrlRefused) when any of them may not receive events: a name
    with one public and one private address is refused, as a rebinding attacker would make it."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise UrlRefused(f"cannot resolve {host}: {error.strerror or error}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        refusal = address_refusal(address, allow_private=allow_private)
        if refusal is not None:
            raise UrlRefused(f"{host}: {refusal}")
    if not addresses:
        raise UrlRefused(f"{host} resolves to no address")
    return addresses


async def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse (UrlRefused) a URL that is not http(s) or resolves to an address events may not go to."""
    host, port = check_url_shape(url)
    await resolve_allowed(host, port, allow_private=allow_private)


# --- writing events -----------------------------------------------------------------------------------------


async def emit(
    conn: db.Connection,
    event_type: EventType | str,
    org_id: uuid.UUID | str | None,
    data: Mapping[str, Any],
    *,
    dedupe_key: str | None,
) -> str | None:
    """Write an event in the caller's transaction; its id, or None when `dedupe_key` was written before (the
    same occurrence, seen again)."""
    return await conn.fetchval(
        "SELECT driftlock.emit_event($1, $2::uuid, $3::jsonb, $4)",
        str(event_type),
        str(org_id) if org_id is not None else None,
        json.loads(to_json(data)),  # plain JSON values: the pool's jsonb codec encodes them
        dedupe_key,
    )


async def emit_spend_cap_reached(
    conn: db.Connection,
    org_id: uuid.UUID,
    period_start: datetime,
    *,
    used: int,
    cap: int,
    cap_kind: str = "spend_cap",
) -> str | None:
    """usage.spend_cap_reached, once per organisation, period and kind of cap (`spend_cap`: the customer's
    max_overage_units; `hard_cap`: the plan's, written by a trigger on usage_totals)."""
    return await emit(
        conn,
        EventType.USAGE_SPEND_CAP_REACHED,
        org_id,
        {"used": used, "cap": cap, "cap_kind": cap_kind, "period_start": period_start},
        dedupe_key=f"usage.spend_cap_reached:{cap_kind}:{org_id}:{int(period_start.timestamp())}",
    )
