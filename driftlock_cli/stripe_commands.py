"""The CLI commands that close the billing loop: `stripe export [--once]` (report usage to Stripe now),
`stripe exports list` (what was reported, is pending or failed), `stripe sync` (pull subscriptions from Stripe's
API and apply them) and `webhooks replay` (apply stored events again).

webhook_commands.py registers them beside its own; the service modules are imported only when a command runs.
"""

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from driftlock_cli import arguments
from driftlock_cli.output import Printer, table
from driftlock_kernel import db
from driftlock_kernel.background import wait_set
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.settings import Settings

EXPORT_STATES = ("pending", "sent", "failed", "skipped")
REPLAYABLE_OUTCOMES = ("failed", "deferred")
EXPORT_COLUMNS = [
    "created_at",
    "org_id",
    "period_start",
    "units",
    "state",
    "attempts",
    "identifier",
    "stripe_request_id",
    "error",
]


class StripeCommandError(OperatorError):
    pass


@contextlib.asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(
        settings.require_database_url(),
        application_name="driftlock-gateway cli",
        max_size=4,
        transaction_pooler=settings.database_transaction_pooler,
    )
    try:
        yield pool
    finally:
        await pool.close()


# --- commands ---------------------------------------------------------------------------------------------


async def cmd_stripe_export(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from billing_webhooks.app import export_lease, export_rules, runner_name, stripe_api
    from billing_webhooks.usage_export import export_store
    from billing_webhooks.usage_export.exporter import Exporter

    api = stripe_api(settings)
    try:
        async with _pool(settings) as pool:
            exporter = Exporter(
                pool,
                api,
                policy=settings.billing_policy(),
                rules=export_rules(settings),
                interval=settings.stripe_export_interval_seconds,
                lease=export_lease(settings),
                runner=f"cli:{runner_name()}",
            )
            if args.once:
                # An operator asking for a pass now has usually fixed what made rows fail: do not wait for them.
                report = await exporter.run_once(retry_failed_now=True)
                decided, finished, lag = report.decided, report.finished, report.lag_units
            else:
                decided, finished, lag = await _export_until_stopped(
                    exporter, out, settings.stripe_export_interval_seconds
                )
            async with pool.acquire() as conn:
                rows = await export_store.exports_by_id(conn, sorted(set(decided) | set(finished)))
    finally:
        await api.close()
    text = f"Decided {len(decided)} new report(s), finished {len(finished)}; {lag} unit(s) not at Stripe yet."
    if rows:
        text += "\n" + table(rows, EXPORT_COLUMNS)
    out.result({"exports": rows, "decided": len(decided), "finished": len(finished), "lag_units": lag}, text)


async def _export_until_stopped(exporter: Any, out: Printer, interval: float) -> tuple[list[int], list[int], int]:
    """Run passes every interval until SIGINT or SIGTERM; what they did, all together."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    decided: list[int] = []
    finished: list[int] = []
    lag = 0
    while not stopping.is_set():
        report = await exporter.run_once()
        decided += report.decided
        finished += report.finished
        lag = report.lag_units
        if not out.as_json:
            print(f"pass: {len(report.decided)} decided, {len(report.finished)} finished, {lag} lagging", flush=True)
        await wait_set(stopping, interval)
    return decided, finished, lag


async def cmd_stripe_exports_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from billing_webhooks.usage_export import export_store
    from billing_webhooks.usage_export.exports import ExportState

    async with db.connection(
        settings.require_database_url(),
        application_name="driftlock-gateway cli",
        transaction_pooler=settings.database_transaction_pooler,
    ) as conn:
        rows = await export_store.list_exports(
            conn, org_id=args.org, state=ExportState(args.state) if args.state else None, limit=args.limit
        )
    out.result({"exports": rows}, table(rows, EXPORT_COLUMNS) if rows else "No usage reports match.")


async def cmd_stripe_sync(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from billing_webhooks.app import stripe_api
    from billing_webhooks.inbox.sync import sync

    api = stripe_api(settings)
    try:
        async with _pool(settings) as pool:
            report = await sync(pool, api, org_id=args.org, policy=settings.billing_policy())
    finally:
        await api.close()
    changed = [
        {
            "org_id": c.org_id,
            "subscription_id": c.subscription_id,
            "event_id": c.event_id,
            "outcome": c.outcome,
            "detail": c.detail,
            "changes": {column: {"from": old, "to": new} for column, (old, new) in c.changes.items()},
        }
        for c in report.changed
    ]
    lines = [f"Read {report.checked} subscription(s) from Stripe; {len(changed)} changed stored state."]
    for c in report.changed:
        what = ", ".join(f"{column} {old} -> {new}" for column, (old, new) in c.changes.items()) or c.outcome
        lines.append(f"  {c.org_id} {c.subscription_id}: {what}")
    lines += [f"  error: {e['org_id']}: {e['error']}" for e in report.errors]
    out.result({"changed": changed, "checked": report.checked, "errors": report.errors}, "\n".join(lines))
    if report.errors:
        raise StripeCommandError(f"{len(report.errors)} organisation(s) could not be synced; see the errors above")


async def cmd_webhooks_replay(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from billing_webhooks.inbox.replay import replay_event, replay_events

    if (args.event_id is None) == (args.outcome is None):
        raise StripeCommandError("give either an EVENT_ID or --outcome failed|deferred (see `webhooks replay --help`)")
    policy = settings.billing_policy()
    async with _pool(settings) as pool:
        if args.event_id is not None:
            one = await replay_event(pool, args.event_id, policy)
            replayed = [one] if one is not None else []
        else:
            since = datetime.now(UTC) - args.since if args.since else None
            replayed = await replay_events(
                pool, outcome=args.outcome, received_since=since, limit=args.limit, policy=policy
            )
    rows = [
        {
            "id": r.id,
            "type": r.type,
            "previous_outcome": r.previous_outcome,
            "outcome": r.outcome,
            "org_id": r.org_id,
            "detail": r.detail,
        }
        for r in replayed
    ]
    text = (
        table(rows, ["id", "type", "previous_outcome", "outcome", "org_id", "detail"]) if rows else "Nothing to replay."
    )
    out.result({"replayed": rows}, text)


# --- the parser ------------------------------------------------------------------------------------------------


def register(webhooks_actions: Any, stripe_group: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `webhooks replay` and `stripe export|exports|sync` to the webhook and stripe command groups."""
    replay = leaf(
        webhooks_actions,
        "replay",
        cmd_webhooks_replay,
        "apply stored Stripe events again, each in its own transaction, recording the new outcome",
    )
    replay.add_argument("event_id", nargs="?", metavar="EVENT_ID", help="one stored event")
    replay.add_argument("--outcome", choices=REPLAYABLE_OUTCOMES, help="every stored event with this outcome")
    replay.add_argument(
        "--since", type=arguments.duration, metavar="DURATION", help="with --outcome: received within, e.g. 24h"
    )
    arguments.add_limit_option(replay, 1000, "with --outcome: at most N (1000)")

    export = leaf(
        stripe_group,
        "export",
        cmd_stripe_export,
        "report counted usage to Stripe Billing Meters (needs STRIPE_API_KEY); runs until Ctrl-C unless --once",
    )
    export.add_argument(
        "--once", action="store_true", help="one pass now (failed reports are tried again at once), then exit"
    )
    exports = stripe_group.add_parser("exports", help="usage reported to Stripe").add_subparsers(
        dest="exports_command", metavar="ACTION", required=True
    )
    listing = leaf(exports, "list", cmd_stripe_exports_list, "usage reports to Stripe: sent, pending, failed, skipped")
    arguments.add_org_option(listing, "only this organisation's")
    listing.add_argument("--state", choices=EXPORT_STATES, help="only this state")
    arguments.add_limit_option(listing, 100, "at most N, newest first (100)")

    sync = leaf(
        stripe_group,
        "sync",
        cmd_stripe_sync,
        "read subscriptions from Stripe's API and apply them like webhook events, reporting what changed",
    )
    arguments.add_org_option(sync, "only this organisation")
