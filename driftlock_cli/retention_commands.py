"""`driftlock-gateway prune TABLE|all [--older-than D]`: delete rows of the append-only tables past their
retention, in batches. authz replicas do this by themselves every DRIFTLOCK_PRUNE_INTERVAL_SECONDS; the command
is for a one-off clean-up, a scheduled job where automatic pruning is off, or a shorter window.

main.py registers it; `audit prune` and `webhooks prune` are the same for their own tables.
"""

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from driftlock_cli.output import Printer
from driftlock_kernel import db, retention
from driftlock_kernel.durations import parse_duration
from driftlock_kernel.settings import Settings


def configured_retentions(settings: Settings) -> dict[str, timedelta | None]:
    return {
        "meter_flushes": settings.retention_meter_flushes,
        "usage_reports": settings.retention_usage_reports,
        "audit_log": settings.retention_audit_log,
        "audit_denials": settings.retention_audit_denials,
        "stripe_events": settings.retention_stripe_events,
        "events": settings.retention_events,
    }


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


async def cmd_prune(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    names = list(retention.TABLES) if args.table == "all" else [args.table.replace("-", "_")]
    configured = configured_retentions(settings)
    plan = {name: args.older_than or configured[name] for name in names}
    for name, keep in plan.items():
        if keep is not None:
            retention.check_retention(retention.TABLES[name], keep)
    deleted: dict[str, int] = {}
    async with db.connection(
        settings.require_database_url(),
        application_name="driftlock-gateway cli",
        transaction_pooler=settings.database_transaction_pooler,
    ) as conn:
        for name, keep in plan.items():
            if keep is not None:
                deleted[name] = await retention.prune_table(conn, retention.TABLES[name], keep)
    kept = [name for name, keep in plan.items() if keep is None]
    text = "\n".join(f"Deleted {n} row(s) of {name} older than {plan[name]}." for name, n in deleted.items())
    if kept:
        text += ("\n" if text else "") + f"Kept everything in {', '.join(kept)} (retention off)."
    out.result({"deleted": deleted, "kept": kept}, text)


def register(commands: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    prune = leaf(commands, "prune", cmd_prune, "delete rows of append-only tables past their retention, in batches")
    prune.add_argument(
        "table",
        choices=[*(name.replace("_", "-") for name in retention.TABLES), "all"],
        help="the table to prune, or all of them",
    )
    prune.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="e.g. 30d (default: the configured retention, DRIFTLOCK_RETENTION_<TABLE>)",
    )
