"""`events endpoints add|list|update|remove|test`, `events deliveries list` and `events listen`: an organisation's
event endpoints, what was delivered to them, and a local receiver that prints each event it verifies (for `dev`).

Like the other management commands they work on the database directly, through the kernel store the API uses,
and changes are audited with the local user as the caller."""

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from driftlock_cli import arguments
from driftlock_cli.output import Printer, fields, table
from driftlock_kernel import admin_audit, db, event_endpoints, events
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.settings import Settings

PROG = "driftlock-gateway"
Leaf = Callable[..., argparse.ArgumentParser]
LISTEN_PORT = 8787


class EventsCommandError(OperatorError):
    pass


def _types(text: str) -> list[str]:
    try:
        return list(events.parse_event_types(text.split(",")))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"a number from 1 to 1000, got {text!r}")
    return int(text)


async def _run(settings: Settings, work: Callable[[db.Connection], Any], *, transaction: bool = True) -> Any:
    async with db.connection(
        settings.require_database_url(),
        application_name=f"{PROG} cli",
        transaction_pooler=settings.database_transaction_pooler,
    ) as conn:
        try:
            if not transaction:
                return await work(conn)
            async with conn.transaction():
                return await work(conn)
        except (events.UrlRefused, event_endpoints.TooManyEndpoints) as error:
            raise EventsCommandError(str(error)) from None


ENDPOINT_COLUMNS = ["id", "url", "event_types", "enabled", "failing_since", "created_at"]


async def cmd_endpoints_add(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def add(conn: db.Connection) -> tuple[event_endpoints.EventEndpoint, str]:
        endpoint, secret = await event_endpoints.create_endpoint(
            conn, args.org, args.url, args.types or [], allow_private=settings.events_allow_private_urls
        )
        await admin_audit.record(
            conn, admin_audit.cli_actor(), "event_endpoint.create", org_id=args.org,
            detail={"endpoint_id": str(endpoint.id)},
        )  # fmt: skip
        return endpoint, secret

    endpoint, secret = await _run(settings, add)
    text = (
        fields(endpoint.as_dict(), ["id", "org_id", "url", "event_types"])
        + f"\nsecret  {secret}\n(the secret is shown once: verify what the endpoint receives with it)"
    )
    out.result({**endpoint.as_dict(), "secret": secret}, text)


async def cmd_endpoints_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    found = await _run(settings, lambda conn: event_endpoints.list_endpoints(conn, args.org), transaction=False)
    rows = [endpoint.as_dict() for endpoint in found]
    out.result({"org_id": args.org, "endpoints": rows}, table(rows, ENDPOINT_COLUMNS) if rows else "No endpoints.")


async def cmd_endpoints_update(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def update(conn: db.Connection) -> event_endpoints.EventEndpoint:
        endpoint = await event_endpoints.update_endpoint(
            conn,
            args.endpoint_id,
            url=args.url,
            event_types=[] if args.all_types else args.types,
            allow_private=settings.events_allow_private_urls,
        )
        await admin_audit.record(
            conn, admin_audit.cli_actor(), "event_endpoint.update", org_id=endpoint.org_id,
            detail={"endpoint_id": str(endpoint.id)},
        )  # fmt: skip
        return endpoint

    endpoint = await _run(settings, update)
    out.result(endpoint.as_dict(), f"Updated (and enabled) endpoint {endpoint.id}.\n" + fields(endpoint.as_dict()))


async def cmd_endpoints_remove(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def remove(conn: db.Connection) -> event_endpoints.EventEndpoint:
        endpoint = await event_endpoints.delete_endpoint(conn, args.endpoint_id)
        await admin_audit.record(
            conn, admin_audit.cli_actor(), "event_endpoint.delete", org_id=endpoint.org_id,
            detail={"endpoint_id": str(endpoint.id)},
        )  # fmt: skip
        return endpoint

    endpoint = await _run(settings, remove)
    out.result({"id": endpoint.id, "removed": True}, f"Removed endpoint {endpoint.id} ({endpoint.url}).")


async def cmd_endpoints_test(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def test(conn: db.Connection) -> str:
        endpoint = await event_endpoints.get_endpoint(conn, args.endpoint_id)
        return await event_endpoints.send_test(conn, endpoint)

    event_id = await _run(settings, test, transaction=False)
    out.result(
        {"endpoint_id": args.endpoint_id, "event_id": event_id},
        f"Queued test event {event_id}; see `{PROG} events deliveries list --endpoint {args.endpoint_id}`.",
    )


async def cmd_deliveries_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    found = await _run(
        settings,
        lambda conn: event_endpoints.list_deliveries(
            conn, org_id=args.org, endpoint_id=args.endpoint, state=args.state, limit=args.limit
        ),
        transaction=False,
    )
    rows = [delivery.as_dict() for delivery in found]
    columns = ["event_id", "event_type", "url", "state", "attempts", "last_status", "last_error", "created_at"]
    for row in rows:
        row["url"] = row["url"] or "(operator)"
    out.result({"deliveries": rows}, table(rows, columns) if rows else "No deliveries.")


# --- a local receiver -----------------------------------------------------------------------------------------


def verified(secret: str, headers: Any, body: bytes) -> bool:
    """Standard Webhooks, as a receiver checks it (docs/events.md)."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(time.time() - int(stamp)) > 300:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
    return any(
        hmac.compare_digest(part.partition(",")[2].encode(), expected)
        for part in headers.get("webhook-signature", "").split(" ")
        if part.startswith("v1,")
    )


async def cmd_listen(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from aiohttp import web

    url = f"http://127.0.0.1:{args.port}/events"

    async def add(conn: db.Connection) -> tuple[event_endpoints.EventEndpoint, str]:
        # Its own loopback address: the operator at this machine asked for it.
        return await event_endpoints.create_endpoint(conn, args.org, url, args.types or [], allow_private=True)

    endpoint, secret = await _run(settings, add)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        ok = verified(secret, request.headers, body)
        try:
            event = json.loads(body)
        except ValueError:
            event = {"type": "(not JSON)"}
        if out.as_json:
            line = json.dumps({"webhook_id": request.headers.get("webhook-id"), "verified": ok, **event})
        else:
            line = (
                f"{event.get('timestamp', '')}  {event.get('type', '?'):<28} {'verified' if ok else 'BAD SIGNATURE'}  "
            )
            line += json.dumps(event.get("data", {}), separators=(",", ":"))
        print(line, flush=True)
        return web.Response(status=204 if ok else 400)

    app = web.Application()
    app.router.add_post("/events", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, "127.0.0.1", args.port).start()
        except OSError as error:
            raise EventsCommandError(f"cannot listen on 127.0.0.1:{args.port}: {error.strerror or error}") from None
        print(
            f"Listening on {url} for organisation {args.org}'s events (endpoint {endpoint.id}); Ctrl-C stops and "
            "removes the endpoint. The gateway must run with DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS=true (dev does).",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await _run(settings, lambda conn: event_endpoints.delete_endpoint(conn, endpoint.id))


# --- the parser -----------------------------------------------------------------------------------------------


def register(commands: Any, leaf: Leaf) -> None:
    group = commands.add_parser("events", help="events to the product: endpoints, deliveries, a local receiver")
    actions = group.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    endpoints = actions.add_parser("endpoints", help="an organisation's event endpoints").add_subparsers(
        dest="endpoints_command", metavar="ACTION", required=True
    )
    add = leaf(endpoints, "add", cmd_endpoints_add, "a new endpoint; prints its signing secret, once")
    add.add_argument("--org", type=arguments.org_id, required=True, metavar="ORG_ID")
    add.add_argument("url", help="an http(s) URL resolving to a public address")
    add.add_argument("--types", type=_types, metavar="TYPE,...", help="only these event types (default: all)")
    listing = leaf(endpoints, "list", cmd_endpoints_list, "an organisation's endpoints (never their secrets)")
    listing.add_argument("--org", type=arguments.org_id, required=True, metavar="ORG_ID")
    update = leaf(endpoints, "update", cmd_endpoints_update, "change an endpoint; enables a disabled one again")
    update.add_argument("endpoint_id", type=arguments.uuid_of("endpoint id"))
    update.add_argument("--url", help="the new URL")
    kinds = update.add_mutually_exclusive_group()
    kinds.add_argument("--types", type=_types, metavar="TYPE,...", help="only these event types")
    kinds.add_argument("--all-types", action="store_true", help="every event type")
    remove = leaf(endpoints, "remove", cmd_endpoints_remove, "delete an endpoint and its pending deliveries")
    remove.add_argument("endpoint_id", type=arguments.uuid_of("endpoint id"))
    test = leaf(endpoints, "test", cmd_endpoints_test, "queue an event_endpoint.test event for one endpoint")
    test.add_argument("endpoint_id", type=arguments.uuid_of("endpoint id"))

    deliveries = actions.add_parser("deliveries", help="what was delivered").add_subparsers(
        dest="deliveries_command", metavar="ACTION", required=True
    )
    dlist = leaf(deliveries, "list", cmd_deliveries_list, "deliveries, newest first, with their last error")
    dlist.add_argument("--org", type=arguments.org_id, metavar="ORG_ID", help="to this organisation's endpoints")
    dlist.add_argument(
        "--endpoint", type=arguments.uuid_of("endpoint id"), metavar="ENDPOINT_ID", help="to this endpoint"
    )
    dlist.add_argument("--state", choices=event_endpoints.DELIVERY_STATES, help="only this state")
    dlist.add_argument("--limit", type=_limit, default=100, metavar="N", help="at most N (100)")

    listen = leaf(actions, "listen", cmd_listen, "receive an organisation's events here and print each one")
    listen.add_argument("--org", type=arguments.org_id, required=True, metavar="ORG_ID")
    listen.add_argument("--port", type=int, default=LISTEN_PORT, help=f"local port (default {LISTEN_PORT})")
    listen.add_argument("--types", type=_types, metavar="TYPE,...", help="only these event types (default: all)")
