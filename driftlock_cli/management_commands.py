"""The CLI side of the management API: `keys show|update|roll`, `orgs list|set-plan`, `jwks` (and `jwks
generate-key`), and `admin-token` (mints a token for the management API, for curl and scripts).

Like the other commands they work on the database directly, through the same kernel stores as the API, and
every change is written to the audit log with the operator (the local user) as the caller. main.py registers
them into its `keys` and `orgs` groups.
"""

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from driftlock_cli import arguments
from driftlock_cli.output import Printer, fields, table, text_value
from driftlock_cli.store_access import ManagementCommandError, in_transaction
from driftlock_kernel import admin_audit, api_keys, context_keys, db, orgs, paging
from driftlock_kernel.settings import Settings
from driftlock_kernel.tokens import MAX_LIFETIME_SECONDS, mint_admin_token

PROG = "driftlock-gateway"
DEFAULT_ADMIN_ISSUER = "driftlock-gateway-cli"

Leaf = Callable[..., argparse.ArgumentParser]


def _overlap(text: str) -> timedelta:
    value = timedelta(0) if text.strip() == "0" else arguments.duration(text)
    if value > api_keys.MAX_ROLL_OVERLAP:
        raise argparse.ArgumentTypeError(f"at most {api_keys.MAX_ROLL_OVERLAP.days}d, got {text!r}")
    return value


def _lifetime(text: str) -> timedelta:
    value = arguments.duration(text)
    if not timedelta(0) < value <= timedelta(seconds=MAX_LIFETIME_SECONDS):
        raise argparse.ArgumentTypeError(f"an admin token lives at most 5m, got {text!r}")
    return value


def _metadata(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
        return api_keys.check_metadata(value)
    except (ValueError, api_keys.InvalidMetadata) as error:
        raise argparse.ArgumentTypeError(f"--metadata must be a JSON object: {error}") from None


def _kid(text: str) -> str:
    if not context_keys.KID.fullmatch(text):
        raise argparse.ArgumentTypeError("a kid is 1 to 64 of A-Z a-z 0-9 . _ -")
    return text


# --- keys -------------------------------------------------------------------------------------------------


def _key_text(key: api_keys.ApiKey) -> str:
    obj = key.as_dict()
    return fields(obj, ["id", "org_id", "name", "prefix", "environment", "scopes", "expires_at", "revoked_at",
                        "last_used_at", "rolled_to", "metadata", "created_at"])  # fmt: skip


async def cmd_keys_show(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    key = await in_transaction(settings, lambda conn: api_keys.get_key(conn, args.key_id))
    out.result(key.as_dict(), _key_text(key))


async def cmd_keys_update(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    changes: dict[str, Any] = {}
    if args.name is not None:
        changes["name"] = args.name or None
    if args.scopes is not None:
        changes["scopes"] = args.scopes
    if args.expires_in is not None:
        changes["expires_in"] = args.expires_in
    elif args.no_expiry:
        changes["expires_in"] = None
    if args.metadata is not None:
        changes["metadata"] = args.metadata
    from driftlock_cli import control_commands  # (it imports this module)

    changes.update(control_commands.key_limit_changes(args))
    if not changes:
        raise ManagementCommandError(
            "nothing to change: give --name, --scopes, --expires-in, --no-expiry, --metadata, --max-units, "
            "--rate-limit, --allow-cidr, --any-source or --products"
        )

    async def update(conn: db.Connection) -> api_keys.ApiKey:
        if "rate_limit_rps" in changes:
            current = await api_keys.get_key(conn, args.key_id)
            await control_commands.with_rate_above_plan(conn, current.org_id, changes)
        try:
            key = await api_keys.update_key(conn, args.key_id, **changes)
        except api_keys.KeyStateError as error:
            raise ManagementCommandError(str(error)) from None
        except api_keys.InvalidLimit as error:
            raise control_commands.limit_error(error) from None
        await admin_audit.record(
            conn, admin_audit.cli_actor(), "keys.update", org_id=key.org_id, key_id=key.id,
            detail={"changed": sorted(changes)},
        )  # fmt: skip
        return key

    key = await in_transaction(settings, update)
    out.result(key.as_dict(), f"Updated key {key.id} ({', '.join(sorted(changes))}).\n" + _key_text(key))


async def cmd_keys_roll(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def roll(conn: db.Connection) -> tuple[api_keys.ApiKey, str, api_keys.ApiKey]:
        try:
            new, secret, old = await api_keys.roll_key(conn, args.key_id, overlap=args.overlap)
        except api_keys.KeyStateError as error:
            raise ManagementCommandError(str(error)) from None
        await admin_audit.record(
            conn, admin_audit.cli_actor(), "keys.roll", org_id=old.org_id, key_id=old.id,
            detail={"new_key_id": str(new.id), "overlap_seconds": int(args.overlap.total_seconds())},
        )  # fmt: skip
        return new, secret, old

    new, secret, old = await in_transaction(settings, roll)
    obj = new.as_dict() | {"key": secret, "old_key_id": old.id, "old_expires_at": old.expires_at}
    text = (
        f"Rolled key {old.id} to {new.id}. The old key works until {text_value(old.expires_at)}.\n"
        f"This is the only time the new key is shown; store it now:\n\n    {secret}\n"
    )
    out.result(obj, text)


# --- organisations ----------------------------------------------------------------------------------------


async def cmd_orgs_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def every_org(conn: db.Connection) -> list[orgs.Organization]:
        found: list[orgs.Organization] = []
        cursor = None
        while True:
            page, cursor = await orgs.list_orgs_page(conn, limit=paging.MAX_PAGE_SIZE, after=cursor)
            found += page
            if cursor is None:
                return found

    now = datetime.now(UTC)
    rows = [org.as_dict(now) for org in await in_transaction(settings, every_org)]
    columns = ["id", "name", "plan", "billing_status", "suspended", "created_at"]
    out.result({"orgs": rows}, table(rows, columns) if rows else "No organisations.")


async def cmd_orgs_set_plan(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def set_plan(conn: db.Connection) -> tuple[orgs.Organization, str]:
        before = await orgs.get_org(conn, args.org_id)
        org = await orgs.set_plan(conn, args.org_id, args.plan)
        await admin_audit.record(
            conn, admin_audit.cli_actor(), "orgs.set_plan", org_id=org.id, detail={"from": before.plan, "to": org.plan}
        )
        return org, before.plan

    org, previous = await in_transaction(settings, set_plan)
    note = " (unchanged)" if previous == org.plan else f" (was {previous})"
    out.result(org.as_dict(datetime.now(UTC)), f"Organisation {org.id} is on plan {org.plan}{note}.")


# --- context-token keys and admin tokens ------------------------------------------------------------------


async def cmd_jwks(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    """The JWKS is a JSON document whatever the flag: the same bytes authz serves at /.well-known/jwks.json."""
    document = context_keys.load(settings).jwks()
    out.result(document, json.dumps(document, indent=2))


async def cmd_jwks_generate_key(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    key = context_keys.Ed25519Key.generate(args.kid)
    entry = key.entry()
    out.result(
        {"kid": key.kid, "entry": entry, "public_jwk": key.public_jwk()},
        "A new Ed25519 context-token signing key (a secret; shown only now). Add the line to\n"
        "DRIFTLOCK_CONTEXT_SIGNING_KEYS (comma-separated) or to DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE (one per line):\n\n"
        f"    {entry}\n",
    )


async def cmd_admin_token(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    secret = settings.require_admin_secret()
    lifetime = int(args.lifetime.total_seconds())
    token = mint_admin_token(
        secret, issuer=args.issuer, subject=args.subject, org_id=args.org, lifetime_seconds=lifetime
    )
    if out.as_json:
        out.result({"token": token, "expires_in": lifetime}, token)
    else:
        print(token, flush=True)  # alone on its line, for $(driftlock-gateway admin-token)


def register(commands: Any, leaf: Leaf, *, keys_group: Any, orgs_group: Any) -> None:
    show = leaf(keys_group, "show", cmd_keys_show, "show one key (never its secret), with when it was last used")
    show.add_argument("key_id", type=arguments.key_id)

    update = leaf(keys_group, "update", cmd_keys_update, "change a key's name, scopes, expiry or metadata")
    update.add_argument("key_id", type=arguments.key_id)
    update.add_argument("--name", help="the new name ('' removes it)")
    update.add_argument("--scopes", type=arguments.scopes, metavar="detect,ingest,read", help="the new scopes")
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=arguments.duration, metavar="DURATION", help="expires this long from now")
    expiry.add_argument("--no-expiry", action="store_true", help="never expires")
    update.add_argument("--metadata", type=_metadata, metavar="JSON", help="replaces the metadata, e.g. '{}'")

    roll = leaf(
        keys_group,
        "roll",
        cmd_keys_roll,
        "replace a key by a new one (new secret, same grants); the old one works until the overlap ends",
    )
    roll.add_argument("key_id", type=arguments.key_id)
    roll.add_argument(
        "--overlap",
        type=_overlap,
        default=timedelta(0),
        metavar="DURATION",
        help="how long the old key keeps working, e.g. 24h (default 0: it stops now; at most 30d)",
    )

    leaf(orgs_group, "list", cmd_orgs_list, "list every organisation, oldest first")
    set_plan = leaf(orgs_group, "set-plan", cmd_orgs_set_plan, "put an organisation on another plan")
    set_plan.add_argument("org_id", type=arguments.org_id)
    set_plan.add_argument("plan")

    jwks = leaf(
        commands,
        "jwks",
        cmd_jwks,
        "print the public keys that verify context tokens (the JWKS authz serves); "
        "`jwks generate-key` makes a new signing key",
    )
    jwks.usage = f"{jwks.prog} [-h] [--json] [{{generate-key}} ...]"
    actions = jwks.add_subparsers(dest="jwks_command", metavar="{generate-key}", required=False)
    generate = leaf(actions, "generate-key", cmd_jwks_generate_key, "make a new Ed25519 context-token signing key")
    generate.add_argument("--kid", type=_kid, help="its key id (default: its RFC 7638 thumbprint)")

    token = leaf(
        commands,
        "admin-token",
        cmd_admin_token,
        "print a token for the management API and UsageService, signed with DRIFTLOCK_ADMIN_TOKEN_SECRET",
    )
    token.add_argument(
        "--issuer", default=DEFAULT_ADMIN_ISSUER, help=f"who calls (iss; default {DEFAULT_ADMIN_ISSUER})"
    )
    token.add_argument("--subject", help="on whose behalf (sub), e.g. a dashboard user")
    arguments.add_org_option(token, "restrict it to one organisation")
    token.add_argument(
        "--lifetime", type=_lifetime, default=timedelta(seconds=MAX_LIFETIME_SECONDS), metavar="DURATION",
        help="at most 5m (the default)",
    )  # fmt: skip
