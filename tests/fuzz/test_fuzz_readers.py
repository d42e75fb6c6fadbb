"""Bounded fuzzing (hypothesis) of the two readers that take outside input as it comes: the Stripe payload reader
(billing_webhooks/inbox/events.py) and the credential reader (authz_service/check/credentials.py). Run by
`make fuzz` (and once in .ci/run), not by `make test`; FUZZ_EXAMPLES sets how many inputs each target gets
(default 3,000).

- envelope() + normalize() on any JSON value, and on real events with their fields replaced by anything: a
  MalformedEvent or one of our event types, never another exception, and what comes out is well-typed.
- read_credential() on any headers: a parsed key or a DenyCode, never an exception; a parsed key is exactly
  the hash of a well-formed key present in the headers.
"""

import copy
import json
import os
from datetime import datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_service.check.credentials import read_credential
from authz_service.check.decision import DenyCode
from billing_webhooks.inbox.events import (
    CheckoutCompleted,
    Envelope,
    InvoicePayment,
    MalformedEvent,
    SubscriptionSnapshot,
    envelope,
    normalize,
)
from driftlock_cli import stripe_player
from driftlock_kernel.keys import Environment, generate_key, hash_key, parse_key

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "3000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
TYPES = [
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.trial_will_end",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
]
ORG = "6f0c2a4e-8d1b-4c3a-9e5f-0a1b2c3d4e5f"


def read(payload) -> object:
    """What the webhook does with a verified body: the envelope, then our event. Only MalformedEvent may come
    out of it."""
    try:
        event = envelope(payload)
    except MalformedEvent:
        return None
    assert isinstance(event, Envelope) and isinstance(event.created, datetime)
    try:
        normalized = normalize(event)
    except MalformedEvent:
        return None
    assert normalized is None or isinstance(normalized, CheckoutCompleted | SubscriptionSnapshot | InvoicePayment)
    return normalized


@FUZZ
@given(payload=json_values)
def test_the_stripe_reader_takes_any_json_value(payload):
    read(payload)


@st.composite
def mangled_events(draw):
    """A real event of a handled type (either API shape) with some fields, at any depth, replaced or removed."""
    event = stripe_player.build_event(
        draw(st.sampled_from(TYPES)),
        org_id=ORG,
        api_version=draw(st.sampled_from(["2024-06-20", "2025-03-31.basil"])),
        status=draw(st.sampled_from([None, "active", "past_due", "trialing", "canceled"])),
    )
    event = json.loads(json.dumps(event))
    for _ in range(draw(st.integers(1, 6))):
        node = event
        path = []
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append(key)
            if not isinstance(node[key], dict | list):
                break
            node = node[key]
        if not path:
            continue
        parent = event
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return event


@FUZZ
@given(event=mangled_events())
def test_the_stripe_reader_takes_real_events_with_any_field_mangled(event):
    before = copy.deepcopy(event)
    read(event)
    assert event == before  # the reader never changes what it reads


KEYS = [generate_key(Environment.LIVE).secret, generate_key(Environment.TEST).secret]
header_names = st.sampled_from(["authorization", "x-api-key", "x-request-id", "cookie"])
header_values = st.one_of(
    st.text(max_size=80),
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: f"Bearer {k}"),
    st.tuples(st.sampled_from(["Bearer", "bearer", "Basic", ""]), st.text(max_size=60)).map(" ".join),
    st.sampled_from(KEYS).map(lambda k: f"{k},{k}"),
)


@FUZZ
@given(headers=st.dictionaries(header_names, header_values, max_size=4))
def test_the_credential_reader_takes_any_headers(headers):
    result = read_credential(headers)
    if isinstance(result, DenyCode):
        assert result in (DenyCode.MISSING_API_KEY, DenyCode.INVALID_API_KEY)
        return
    candidates = [headers.get("x-api-key", "").strip()]
    scheme, _, rest = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(rest.strip())
    matching = [c for c in candidates if c and hash_key(c) == result.hash]
    assert matching, "a parsed key must be one the request carried"
    assert parse_key(matching[0]) == result
