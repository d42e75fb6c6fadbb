"""`usage history`, `keys usage`, `audit list`: the usage history and the audit log, read from the database with
the kernel's queries (driftlock_kernel/usage_history.py), the ones the management API answers with."""

import argparse
import csv
import io
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from driftlock_cli import arguments
from driftlock_cli.output import Printer, table
from driftlock_kernel import api_keys, db, orgs, usage_history
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.settings import Settings
from driftlock_kernel.usage_history import Granularity, GroupBy, HistoryError

WithDb = Callable[[Settings, Callable[[db.Connection], Coroutine[Any, Any, Any]]], Coroutine[Any, Any, Any]]
HISTORY_COLUMNS = ("billable_units", "refunded_units", "requests", "denied_requests")
USAGE_HISTORY = "history"


class HistoryCliError(OperatorError):
    pass


def _org_id(text: str | None) -> uuid.UUID:
    if not text:
        raise HistoryCliError("usage history needs an organisation id: usage history ORG_ID")
    try:
        return arguments.org_id(text)
    except argparse.ArgumentTypeError as error:
        raise HistoryCliError(str(error)) from None


def history_csv(buckets: list[usage_history.Bucket], group_by: GroupBy) -> str:
    """The buckets as CSV (a header, then a row per bucket): the same figures as the JSON."""
    group_column = "product" if group_by is GroupBy.PRODUCT else "key_id"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["start", group_column, *HISTORY_COLUMNS])
    for bucket in buckets:
        row = bucket.as_dict()
        writer.writerow([row["start"], row[group_column], *(row[c] for c in HISTORY_COLUMNS)])
    return out.getvalue().rstrip("\n")


async def usage_history_command(
    args: argparse.Namespace, settings: Settings, out: Printer, with_db: WithDb, org_text: str | None
) -> None:
    org_id = _org_id(org_text)
    granularity = Granularity(args.granularity)
    group_by = GroupBy(args.by)
    now = datetime.now(UTC)
    try:
        start, end = usage_history.history_window(granularity, now - args.since, now, now)
    except HistoryError as error:
        raise HistoryCliError(str(error)) from None

    async def read(conn: db.Connection) -> list[usage_history.Bucket]:
        await orgs.get_org(conn, org_id)
        return await usage_history.history(conn, org_id, granularity, group_by, start, end)

    try:
        buckets = await with_db(settings, read)
    except HistoryError as error:
        raise HistoryCliError(str(error)) from None
    if args.csv:
        print(history_csv(buckets, group_by), file=out.stream, flush=True)
        return
    rows = [b.as_dict() for b in buckets]
    document = {
        "org_id": str(org_id),
        "granularity": granularity.value,
        "group_by": group_by.value,
        "start": start,
        "end": end,
        "buckets": rows,
    }
    group_column = "product" if group_by is GroupBy.PRODUCT else "key_id"
    total = sum(b.billable_units for b in buckets)
    text = (
        table(rows, ["start", group_column, *HISTORY_COLUMNS]) + f"\n{total} billable units in {len(rows)} buckets"
        if rows
        else "No usage in this range."
    )
    out.result(document, text)


async def units_this_period(conn: db.Connection, org_id: uuid.UUID, found: list[api_keys.ApiKey]) -> dict[str, int]:
    """Each key's billable units in its organisation's current billing period (for `keys list`)."""
    if not found:
        return {}
    period = (await orgs.get_org(conn, org_id)).billing_period(datetime.now(UTC))
    return await usage_history.units_of_keys(conn, [key.id for key in found], period.start)


async def keys_usage_command(args: argparse.Namespace, settings: Settings, out: Printer, with_db: WithDb) -> None:
    async def read(conn: db.Connection) -> usage_history.KeyUsage:
        key = await api_keys.get_key(conn, args.key_id)
        org = await orgs.get_org(conn, key.org_id)
        period = org.billing_period(datetime.now(UTC))
        return await usage_history.key_usage(conn, key.id, org.id, period.start, period.end)

    usage = await with_db(settings, read)
    out.result(
        usage.as_dict(),
        f"Key {usage.key_id}, period {usage.as_dict()['period_start']} to {usage.as_dict()['period_end']}: "
        f"{usage.billable_units} billable units ({usage.refunded_units} refunded), {usage.requests} calls served.",
    )


async def audit_list_command(args: argparse.Namespace, settings: Settings, out: Printer, with_db: WithDb) -> None:
    since = datetime.now(UTC) - args.since

    async def read(conn: db.Connection) -> tuple[list[usage_history.AuditEntry], list[usage_history.DenialCount]]:
        await orgs.get_org(conn, args.org)
        entries, _ = await usage_history.audit_entries(
            conn, args.org, since=since, action=args.action, page_size=args.limit
        )
        denials = await usage_history.denials_per_minute(conn, args.org, since=since)
        return entries, denials

    try:
        entries, denials = await with_db(settings, read)
    except HistoryError as error:
        raise HistoryCliError(str(error)) from None
    rows = [e.as_dict() for e in entries]
    document = {"org_id": str(args.org), "entries": rows, "denials_per_minute": [d.as_dict() for d in denials]}
    columns = ["at", "action", "code", "key_id", "actor_issuer", "actor_subject", "request_id"]
    text = table(rows, columns) if rows else "No audit entries in this range."
    if denials:
        text += "\n\nRefused checks per minute:\n" + table([d.as_dict() for d in denials], ["minute", "code", "count"])
    out.result(document, text)


def add_history_arguments(usage_command: argparse.ArgumentParser) -> None:
    """`usage history ORG_ID [...]` shares the `usage` command (whose positional is ORG_ID or `history`)."""
    usage_command.add_argument("history_org_id", nargs="?", metavar="", help=argparse.SUPPRESS)
    history = usage_command.add_argument_group("usage history ORG_ID (hour or day buckets, per product or key)")
    history.add_argument("--granularity", choices=[g.value for g in Granularity], default=Granularity.HOUR.value)
    history.add_argument(
        "--since", type=arguments.duration, default=timedelta(days=7), metavar="DURATION", help="e.g. 24h, 7d (default)"
    )
    history.add_argument("--by", choices=[g.value for g in GroupBy], default=GroupBy.PRODUCT.value)
    history.add_argument("--csv", action="store_true", help="CSV instead of a table or JSON")


def add_audit_list(audit_group: Any, leaf: Callable[..., argparse.ArgumentParser], handler: Any) -> None:
    listing = leaf(audit_group, "list", handler, "an organisation's audit entries, newest first")
    arguments.add_org_option(listing, None, required=True)
    listing.add_argument("--since", type=arguments.duration, default=timedelta(days=1), metavar="DURATION", help="24h")
    listing.add_argument("--action", help='e.g. keys.revoke; "request" for the checks the audit keeps')
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N entries (1 to 1000)")
