"""The CLI commands of the Stripe webhook service: `webhooks` (run it), `webhooks events` (what was received and
what became of it), `webhooks prune` (retention of stored events) and `stripe send-event` (a signed,
Stripe-shaped event POSTed to a running service, for `dev` and demos).

main.py registers them; the service package is imported only when a command runs.
"""

import argparse
import json
import ssl
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from billing_webhooks.inbox.decisions import EventOutcome
from billing_webhooks.inbox.events import EventType
from driftlock_cli import arguments, stripe_commands
from driftlock_cli.output import Printer, table
from driftlock_kernel import db, retention
from driftlock_kernel.billing import SubscriptionStatus
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.jsonfmt import iso
from driftlock_kernel.settings import Settings

# Stripe retries a delivery for up to three days; an event pruned sooner could be applied again on a retry.
MIN_RETENTION = timedelta(days=3)
SEND_TIMEOUT_SECONDS = 30.0

# The service's own lists, so that the CLI never offers a type or outcome the service does not know. Both
# modules are plain definitions (no I/O), cheap to import when the parser is built.
HANDLED_TYPES = tuple(EventType)
OUTCOMES = tuple(o.value for o in EventOutcome if o is not EventOutcome.DUPLICATE)  # a duplicate is never stored
SUBSCRIPTION_STATUSES = tuple(SubscriptionStatus)


class WebhookCommandError(OperatorError):
    pass


def _retention(text: str) -> timedelta:
    value = arguments.duration(text)
    if value < MIN_RETENTION:
        raise argparse.ArgumentTypeError(
            f"must be at least 3d, got {text!r}: Stripe retries a delivery for up to three days, and an event "
            "pruned sooner could be applied again"
        )
    return value


def _secret(text: str) -> str:
    if not text.startswith("whsec_"):
        raise argparse.ArgumentTypeError("a webhook signing secret starts with whsec_")
    return text


# --- commands ---------------------------------------------------------------------------------------------


async def cmd_webhooks(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from billing_webhooks.app import serve

    await serve(settings)


async def cmd_webhooks_prune(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    before = datetime.now(UTC) - args.older_than
    async with db.connection(
        settings.require_database_url(),
        application_name="driftlock-gateway cli",
        transaction_pooler=settings.database_transaction_pooler,
    ) as conn:
        deleted = await retention.prune_table(conn, retention.TABLES["stripe_events"], args.older_than)
    out.result(
        {"deleted": deleted, "received_before": before},
        f"Deleted {deleted} stored Stripe event(s) received before {iso(before)}.",
    )


async def cmd_webhooks_events(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from billing_webhooks.inbox.store import list_events

    async with db.connection(
        settings.require_database_url(),
        application_name="driftlock-gateway cli",
        transaction_pooler=settings.database_transaction_pooler,
    ) as conn:
        found = await list_events(conn, org_id=args.org, outcome=args.outcome, event_type=args.type, limit=args.limit)
    columns = ["received_at", "id", "type", "outcome", "org_id", "detail"]
    out.result({"events": found}, table(found, columns) if found else "No stored events match.")


async def cmd_stripe_send_event(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    import aiohttp

    from driftlock_cli import stripe_mirror, stripe_player

    secret = args.secret or (settings.stripe_webhook_secrets[0] if settings.stripe_webhook_secrets else None)
    if secret is None:
        raise WebhookCommandError(
            "no signing secret: set STRIPE_WEBHOOK_SECRET (as the webhook service has it) or pass --secret"
        )
    url = args.url or f"http://127.0.0.1:{settings.envoy_port}/stripe/webhook"
    now = int(time.time())
    created = now - int(args.ago.total_seconds()) if args.ago else now
    event = stripe_player.build_event(
        args.type,
        org_id=args.org,
        api_version=args.api_version,
        created=created,
        event_id=args.event_id,
        customer_id=args.customer,
        subscription_id=args.subscription,
        price_ids=tuple(args.price) if args.price else (stripe_player.DEFAULT_PRICE_ID,),
        status=args.status,
        org_metadata=not args.no_org_metadata,
        cancel_at_period_end=args.cancel_at_period_end,
    )
    body = stripe_player.encode(event)
    headers = {"Content-Type": "application/json", "Stripe-Signature": stripe_player.sign(body, secret, now)}
    local_stripe = stripe_mirror.local_stripe_base(settings.stripe_api_base) if settings.stripe_api_key else None
    if args.skip_webhook and local_stripe is None:
        raise WebhookCommandError(
            "--skip-webhook changes only the local Stripe API, and STRIPE_API_BASE names none on this machine "
            "(run it beside `dev`, which starts one)"
        )
    ssl_context: ssl.SSLContext | bool = True
    if args.cacert:
        try:
            ssl_context = ssl.create_default_context(cafile=args.cacert)
        except (OSError, ssl.SSLError) as error:
            raise WebhookCommandError(f"cannot read the CA file {args.cacert}: {error}") from None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS)) as session:
            if local_stripe is not None:
                # What the event says happened, Stripe's API now says too, so that `stripe sync` agrees with it.
                told = await stripe_mirror.tell_local_stripe(
                    session, local_stripe, settings.stripe_api_key or "", event
                )
                if not told:
                    print(
                        f"note: {local_stripe} is not a local Stripe API of this repository; only the webhook is sent",
                        file=sys.stderr,
                    )
            if args.skip_webhook:
                out.result(
                    {"id": event["id"], "type": args.type, "url": None, "status": None, "stripe_api": local_stripe},
                    f"Recorded {args.type} {event['id']} at the local Stripe API {local_stripe} only; no webhook sent "
                    "(as if it were lost: `stripe sync` repairs).",
                )
                return
            async with session.post(url, data=body, headers=headers, ssl=ssl_context) as response:
                text = await response.text()
                status = response.status
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        reason = str(error) or type(error).__name__
        raise WebhookCommandError(f"cannot reach the webhook service at {url}: {reason}") from None
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"body": text[:500]}
    if not 200 <= status < 300:
        message = answer.get("error", {}).get("message") if isinstance(answer.get("error"), dict) else None
        raise WebhookCommandError(f"the webhook service at {url} answered {status}: {message or text[:200].strip()}")
    result = {"id": event["id"], "type": args.type, "url": url, "status": status, "response": answer}
    outcome = answer.get("outcome", "?")
    detail = f" ({answer['detail']})" if answer.get("detail") else ""
    out.result(result, f"Sent {args.type} {event['id']} to {url}: {status}, {outcome}{detail}.")


# --- the parser ------------------------------------------------------------------------------------------------


def register(commands: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `webhooks [prune]` and `stripe send-event` to the CLI's command parsers."""
    webhooks = leaf(
        commands,
        "webhooks",
        cmd_webhooks,
        "run the Stripe webhook service (POST /stripe/webhook, /healthz, /metrics); "
        "`webhooks events` lists stored events, `webhooks prune` deletes old ones, `webhooks replay` applies "
        "them again",
    )
    # Without an action, `webhooks` runs the service (the contract's command); argparse would show the optional
    # action as required.
    webhooks.usage = f"{webhooks.prog} [-h] [--json] [{{events,prune,replay}} ...]"
    actions = webhooks.add_subparsers(dest="webhooks_command", metavar="{events,prune,replay}", required=False)
    prune = leaf(
        actions, "prune", cmd_webhooks_prune, "delete stored Stripe events received longer ago than a duration"
    )
    prune.add_argument(
        "--older-than", type=_retention, required=True, metavar="DURATION", help="at least 3d, e.g. 30d or 90d"
    )
    events = leaf(actions, "events", cmd_webhooks_events, "list stored Stripe events and their outcomes, newest first")
    arguments.add_org_option(events, "only this organisation's")
    events.add_argument("--outcome", choices=OUTCOMES, help="only this outcome (e.g. failed, deferred)")
    events.add_argument("--type", metavar="TYPE", help="only this Stripe event type")
    arguments.add_limit_option(events, 50, "at most N events (default 50)")

    stripe_group = commands.add_parser(
        "stripe", help="usage to Stripe, stripe sync, and local Stripe tools (send-event calls no Stripe)"
    ).add_subparsers(dest="stripe_command", metavar="ACTION", required=True)
    stripe_commands.register(actions, stripe_group, leaf)
    send = leaf(
        stripe_group,
        "send-event",
        cmd_stripe_send_event,
        "build a Stripe-shaped event of a handled type, sign it like Stripe, and POST it to a webhook service",
    )
    send.add_argument("type", choices=HANDLED_TYPES, metavar="TYPE", help=", ".join(HANDLED_TYPES))
    arguments.add_org_option(send, "the organisation it is about", required=True)
    send.add_argument(
        "--url",
        help="where to POST (default: Envoy on this machine, http://127.0.0.1:$DRIFTLOCK_ENVOY_PORT/stripe/webhook)",
    )
    send.add_argument(
        "--api-version",
        default="2025-03-31.basil",
        help="the API version the event is rendered in; before 2025-03-31 gives the older shape (e.g. 2024-06-20)",
    )
    send.add_argument(
        "--secret", type=_secret, help="whsec_ signing secret (default: the first in STRIPE_WEBHOOK_SECRET)"
    )
    send.add_argument(
        "--status",
        choices=SUBSCRIPTION_STATUSES,
        metavar="STATUS",
        help=f"subscription status, for subscription events: {', '.join(SUBSCRIPTION_STATUSES)}",
    )
    send.add_argument("--price", action="append", metavar="PRICE_ID", help="price of a subscription item (repeatable)")
    send.add_argument("--customer", metavar="CUSTOMER_ID", help="default: one derived from the organisation id")
    send.add_argument("--subscription", metavar="SUBSCRIPTION_ID", help="default: one derived from the organisation id")
    send.add_argument(
        "--cancel-at-period-end",
        action="store_true",
        help="the subscription ends with its period (subscription events)",
    )
    send.add_argument(
        "--ago", type=arguments.duration, metavar="DURATION", help="date the event this long ago, e.g. 8d"
    )
    send.add_argument("--event-id", metavar="EVENT_ID", help="reuse an event id (to see a duplicate delivery)")
    send.add_argument(
        "--cacert",
        metavar="FILE",
        help="trust the certificate authorities in this PEM file for an https:// --url (e.g. `dev --tls`'s)",
    )
    send.add_argument(
        "--skip-webhook",
        action="store_true",
        help="only record the change at the local Stripe API (as if the webhook were lost; `stripe sync` repairs)",
    )
    send.add_argument(
        "--no-org-metadata", action="store_true", help="leave metadata.org_id out of the subscription and invoice"
    )
