"""The CLI side of the customer controls (issue 20): `orgs update --max-overage-units`, `orgs delete`, and the
per-key limits of `keys create|update` (`--max-units`, `--rate-limit`, `--allow-cidr`, `--products`), and
`plans upsert --products`.

Like the other commands they work on the database directly through the kernel's stores, and every change is
audited with the operator (the local user) as the caller. An operator may set a key's rate above its plan's.
"""

import argparse
import uuid
from datetime import UTC, datetime
from typing import Any

from driftlock_cli import arguments
from driftlock_cli.output import Printer, fields
from driftlock_cli.store_access import ManagementCommandError, in_transaction
from driftlock_kernel import admin_audit, api_keys, db, orgs, plans
from driftlock_kernel.settings import Settings

NONE = "none"


def _units_or_none(text: str) -> int | None:
    if text.strip().lower() == NONE:
        return None
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of units or 'none', got {text!r}")
    return int(text)


def _rps_or_none(text: str) -> float | None:
    if text.strip().lower() == NONE:
        return None
    try:
        return api_keys.check_rate_limit(float(text))
    except (ValueError, api_keys.InvalidLimit):
        raise argparse.ArgumentTypeError(f"expected requests per second above 0, or 'none'; got {text!r}") from None


def _cidr(text: str) -> str:
    try:
        api_keys.check_cidrs([text])
    except api_keys.InvalidLimit as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _products_or_none(text: str) -> list[str] | None:
    if text.strip().lower() == NONE:
        return None
    try:
        return list(plans.check_products(text.split(",")))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# --- keys create / update ----------------------------------------------------------------------------------------


def add_key_limit_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    removable = " ('none' removes it)" if update else ""
    parser.add_argument("--max-units", type=_units_or_none, default=plans.UNCHANGED, metavar="N",
                        help=f"billable units per billing period (key_quota_exceeded past it){removable}")  # fmt: skip
    parser.add_argument("--rate-limit", type=_rps_or_none, default=plans.UNCHANGED, metavar="RPS",
                        help=f"requests per second, replacing the plan's (may exceed it){removable}")  # fmt: skip
    parser.add_argument("--allow-cidr", type=_cidr, action="append", metavar="CIDR",
                        help="an IPv4/IPv6 network the key may be used from (repeatable; the given set replaces "
                             "the key's)")  # fmt: skip
    if update:
        parser.add_argument("--any-source", action="store_true", help="remove the key's allowed networks")
    parser.add_argument("--products", type=_products_or_none, default=plans.UNCHANGED, metavar="stream,monitor",
                        help=f"the products the key may call detect on{removable}")  # fmt: skip


def key_limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The update_key (or create_key) arguments the limit options give; rate_limit_above_plan is decided in
    the transaction (with_rate_above_plan)."""
    changes: dict[str, Any] = {}
    for option, column in (("max_units", "max_units_per_period"), ("rate_limit", "rate_limit_rps"),
                           ("products", "products")):  # fmt: skip
        value = getattr(args, option)
        if value is not plans.UNCHANGED:
            changes[column] = value
    if args.allow_cidr:
        changes["allowed_cidrs"] = args.allow_cidr
    elif getattr(args, "any_source", False):
        changes["allowed_cidrs"] = None
    return changes


def key_limits_for_create(args: argparse.Namespace) -> dict[str, Any]:
    return {column: value for column, value in key_limit_changes(args).items() if value is not None}


async def with_rate_above_plan(conn: db.Connection, org_id: uuid.UUID, changes: dict[str, Any]) -> dict[str, Any]:
    """An operator may set a key's rate above its plan's: it is then marked to apply as it is."""
    rps = changes.get("rate_limit_rps")
    if rps is not None:
        plan_rps = await api_keys.plan_rate_limit(conn, org_id)
        changes["rate_limit_above_plan"] = plan_rps is not None and rps > plan_rps
    return changes


def limit_error(error: api_keys.InvalidLimit) -> ManagementCommandError:
    return ManagementCommandError(str(error))


# --- organisations -------------------------------------------------------------------------------------------


async def cmd_orgs_update(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def update(conn: db.Connection) -> orgs.Organization:
        before = await orgs.get_org(conn, args.org_id)
        org = await orgs.set_max_overage_units(conn, args.org_id, args.max_overage_units)
        await admin_audit.record(
            conn, admin_audit.cli_actor(), "orgs.update", org_id=org.id,
            detail={"max_overage_units": {"from": before.max_overage_units, "to": org.max_overage_units}},
        )  # fmt: skip
        return org

    try:
        org = await in_transaction(settings, update)
    except orgs.SpendCapError as error:
        raise ManagementCommandError(str(error)) from None
    cap = "no spend cap" if org.max_overage_units is None else f"a spend cap of {org.max_overage_units} units"
    out.result(
        org.as_dict(datetime.now(UTC)),
        f"Organisation {org.id} has {cap} past its plan's included units.",
    )


async def cmd_orgs_delete(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def delete(conn: db.Connection) -> int:
        revoked = await orgs.delete_org(conn, args.org_id)
        await admin_audit.record(conn, admin_audit.cli_actor(), "orgs.delete", org_id=args.org_id)
        return revoked

    revoked = await in_transaction(settings, delete)
    obj = {"id": args.org_id, "deleted": True, "keys_revoked": revoked}
    out.result(
        obj,
        f"Erased organisation {args.org_id}: {revoked} keys revoked (refused within a second), names and key "
        "metadata erased, audit entries reduced to ids; usage and billing records kept.\n" + fields(obj),
    )


def register(keys_group: Any, orgs_group: Any, plans_group: Any, leaf: Any) -> None:
    add_key_limit_options(keys_group.choices["create"], update=False)
    add_key_limit_options(keys_group.choices["update"], update=True)
    plans_group.choices["upsert"].add_argument(
        "--products", type=_products_or_none, default=plans.UNCHANGED, metavar="stream,monitor",
        help="the products whose detect calls the plan includes ('none': all of them, the default)",
    )  # fmt: skip
    update = leaf(orgs_group, "update", cmd_orgs_update, "set or remove an organisation's spend cap")
    update.add_argument("org_id", type=arguments.org_id)
    update.add_argument("--max-overage-units", type=_units_or_none, required=True, metavar="N",
                        help="on a soft plan, units past the included ones before billable calls answer "
                             "spend_cap_reached until the period ends ('none' removes the cap)")  # fmt: skip
    delete = leaf(orgs_group, "delete", cmd_orgs_delete,
                  "erase an organisation (GDPR): keys stop, names and metadata erased, usage kept")  # fmt: skip
    delete.add_argument("org_id", type=arguments.org_id)
