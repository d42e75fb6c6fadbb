"""`driftlock-gateway`: the operator's command line.

Every error a user can cause ends as one line on stderr and a non-zero exit; --json prints exactly one JSON
object on stdout.
"""

import argparse
import asyncio
import sys
import traceback
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, NoReturn

import asyncpg

from driftlock_cli import (
    arguments,
    control_commands,
    dev_state,
    doctor,
    event_commands,
    history_commands,
    management_commands,
    retention_commands,
    webhook_commands,
)
from driftlock_cli.output import Printer, fields, table, text_value
from driftlock_kernel import admin_audit, api_keys, db, keys, migrate, orgs, plans, usage
from driftlock_kernel.billing import FREE_PLAN, Overage
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.keys import Environment
from driftlock_kernel.settings import MAX_AUTHZ_WORKERS, Settings

PROG = "driftlock-gateway"
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(OperatorError):
    """A mistake or condition the user can act on; printed as one line."""


class _ExitQuietly(Exception):
    """The error was handed to whoever prints it (an authz worker's parent): exit with `code`, print nothing."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage block first; one line is the contract.
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_AUTHZ_WORKERS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of processes from 1 to {MAX_AUTHZ_WORKERS}, got {text!r}"
        )
    return int(text)


def _percent_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole percentage or 'none', got {text!r}")
    return int(text)


def _rps_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected requests per second above 0, or 'none', got {text!r}")
    return value


def _meter_or_none(text: str) -> str | None:
    if text.lower() == "none":
        return None
    try:
        return plans.check_stripe_meter(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_rps(text: str) -> float:
    value = _rps_or_none(text)
    if value is None:
        raise argparse.ArgumentTypeError("test keys always have a rate limit: give requests per second above 0")
    return value


# --- commands ---------------------------------------------------------------------------------------------

CommandHandler = Callable[[argparse.Namespace, Settings, Printer], Coroutine[Any, Any, None]]


async def _with_db(settings: Settings, work: Callable[[db.Connection], Coroutine[Any, Any, Any]]) -> Any:
    async with db.connection(
        settings.require_database_url(),
        application_name=f"{PROG} cli",
        transaction_pooler=settings.database_transaction_pooler,
    ) as conn:
        return await work(conn)


async def cmd_migrate(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    applied = await _with_db(settings, migrate.migrate)
    text = f"Applied {', '.join(applied)}." if applied else "The schema is up to date."
    out.result({"applied": applied}, text)


async def cmd_plans_upsert(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    # Options not given stay UNCHANGED: an update keeps the plan's current values for them.
    plan, created = await _with_db(
        settings,
        lambda conn: plans.upsert_plan(
            conn,
            args.name,
            included_units=args.included_units,
            overage=args.overage if args.overage is plans.UNCHANGED else Overage(args.overage),
            hard_cap_percent=args.hard_cap_percent,
            rate_limit_rps=args.rate_limit,
            stripe_price_ids=plans.UNCHANGED if args.stripe_price is None else args.stripe_price,
            stripe_meter=args.stripe_meter,
            test_included_units=args.test_units,
            test_rate_limit_rps=args.test_rate_limit,
            products=getattr(args, "products", plans.UNCHANGED),
        ),
    )
    obj = plan.as_dict() | {"created": created}
    out.result(obj, f"{'Created' if created else 'Updated'} plan {plan.name}.\n" + fields(plan.as_dict()))


async def cmd_plans_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    found = await _with_db(settings, plans.list_plans)
    rows = [plan.as_dict() for plan in found]
    columns = [
        "name",
        "included_units",
        "overage",
        "hard_cap_percent",
        "rate_limit_rps",
        "stripe_price_ids",
        "stripe_meter",
    ]
    out.result({"plans": rows}, table(rows, columns))


async def _audited(settings: Settings, action: str, work: Callable[[db.Connection], Coroutine[Any, Any, Any]]) -> Any:
    """Run a change and record it in the audit log (the local user as the caller), in one transaction."""

    async def run(conn: db.Connection) -> Any:
        async with conn.transaction():
            result = await work(conn)
            key = result[0] if isinstance(result, tuple) else result
            key_id = key.id if isinstance(key, api_keys.ApiKey) else None
            org_id = key.org_id if isinstance(key, api_keys.ApiKey) else getattr(key, "id", None)
            await admin_audit.record(conn, admin_audit.cli_actor(), action, org_id=org_id, key_id=key_id)
            return result

    return await _with_db(settings, run)


async def cmd_orgs_create(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    org = await _audited(settings, "orgs.create", lambda conn: orgs.create_org(conn, args.name, plan=args.plan))
    obj = org.as_dict(datetime.now(UTC))
    out.result(obj, f"Created organisation {org.id} ({org.name}) on plan {org.plan}.")


async def cmd_orgs_show(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    org = await _with_db(settings, lambda conn: orgs.get_org(conn, args.org_id))
    obj = org.as_dict(datetime.now(UTC))
    out.result(obj, fields(obj))


def _cmd_orgs_suspension(suspended: bool) -> CommandHandler:
    async def command(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
        action = "orgs.suspend" if suspended else "orgs.resume"
        org = await _audited(settings, action, lambda conn: orgs.set_suspended(conn, args.org_id, suspended))
        state = "suspended" if org.suspended_at else "serving"
        out.result(
            {"id": org.id, "suspended": org.suspended_at is not None, "suspended_at": org.suspended_at},
            f"Organisation {org.id} is {state}.",
        )

    return command


async def cmd_keys_create(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    limits = control_commands.key_limits_for_create(args)

    async def create(conn: db.Connection) -> tuple[api_keys.ApiKey, str]:
        return await api_keys.create_key(
            conn,
            args.org,
            name=args.name,
            scopes=args.scopes,
            expires_in=args.expires_in,
            environment=Environment.TEST if args.test else Environment.LIVE,
            **await control_commands.with_rate_above_plan(conn, args.org, limits),
        )

    try:
        key, secret = await _audited(settings, "keys.create", create)
    except api_keys.InvalidLimit as error:
        raise control_commands.limit_error(error) from None
    obj = key.as_dict() | {"key": secret}
    expiry = f", expires {text_value(key.expires_at)}" if key.expires_at else ""
    text = (
        f"Created {key.environment.value} key {key.id} for organisation {key.org_id} "
        f"(scopes {','.join(key.scopes)}{expiry}).\n"
        f"This is the only time the key is shown; store it now:\n\n    {secret}\n"
    )
    out.result(obj, text)


async def cmd_keys_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    async def read(conn: db.Connection) -> tuple[list[api_keys.ApiKey], dict[str, int]]:
        found = await api_keys.list_keys(conn, args.org)
        return found, await history_commands.units_this_period(conn, args.org, found)

    found, units = await _with_db(settings, read)
    rows = [{**key.as_dict(), "billable_units_this_period": units.get(str(key.id), 0)} for key in found]
    columns = ["id", "prefix", "name", "environment", "scopes", "expires_at", "revoked_at", "created_at"]
    columns.append("billable_units_this_period")
    out.result({"org_id": args.org, "keys": rows}, table(rows, columns))


async def cmd_keys_revoke(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    key = await _audited(settings, "keys.revoke", lambda conn: api_keys.revoke_key(conn, args.key_id))
    out.result(key.as_dict(), f"Key {key.id} ({key.display_prefix}…) is revoked since {text_value(key.revoked_at)}.")


async def cmd_usage(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    if args.org_id == history_commands.USAGE_HISTORY:
        await history_commands.usage_history_command(args, settings, out, _with_db, args.history_org_id)
        return
    if args.history_org_id is not None:
        raise CliError(f"unexpected argument {args.history_org_id!r}: usage ORG_ID, or usage history ORG_ID")
    report = await _with_db(
        settings,
        lambda conn: usage.org_usage(
            conn, args.org_id, datetime.now(UTC), settings.billing_policy(), usage.Which(args.period)
        ),
    )
    used = report.used
    text = (
        f"Organisation {report.org_id} on plan {report.plan}, period {text_value(report.period_start)} to "
        f"{text_value(report.period_end)}:\n"
        + "\n".join(f"  {product:<8} {units}" for product, units in used.items() if product != "total")
        + f"\n  {'total':<8} {used['total']} of {report.included} included ({report.ratio:.1%})"
    )
    out.result(report.as_dict(), text)


def _org_id_or_history(text: str) -> uuid.UUID | str:
    if text == history_commands.USAGE_HISTORY:
        return text
    return arguments.org_id(text)


async def cmd_keys_usage(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    await history_commands.keys_usage_command(args, settings, out, _with_db)


async def cmd_audit_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    await history_commands.audit_list_command(args, settings, out, _with_db)


async def cmd_alerts_list(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    alerts = [alert.as_dict() for alert in await _with_db(settings, lambda conn: usage.list_alerts(conn, args.org))]
    columns = ["threshold", "period_start", "used_units", "included_units", "plan", "created_at"]
    out.result({"org_id": args.org, "alerts": alerts}, table(alerts, columns) if alerts else "No alerts raised.")


async def cmd_audit_prune(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    deleted = await _with_db(settings, lambda conn: usage.prune_audit(conn, args.older_than))
    out.result({"deleted": deleted}, f"Deleted {deleted} audit entries older than {args.older_than}.")


async def cmd_authz(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    if args.worker_index is not None:  # started by the parent below
        from driftlock_cli.authz_workers import serve_as_worker

        if args.report_fd is None:
            raise CliError("--worker-index needs --report-fd (both are set by `authz --workers N` for its workers)")

        code = await serve_as_worker(settings, args.worker_index, args.report_fd)
        if code:
            raise _ExitQuietly(code)
        return
    workers = args.workers if args.workers is not None else settings.authz_workers
    if workers == 1:  # one process, no parent: exactly authz as it always ran
        from authz_service.server import serve

        await serve(settings)
        return
    from driftlock_cli.authz_workers import run_workers

    await run_workers(settings, workers)


async def cmd_envoy(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from driftlock_cli import envoy_config

    config = envoy_config.render_from_settings(settings)
    if args.print_config:
        print(envoy_config.dump(config), end="")
        return
    envoy_config.exec_envoy(config, settings, extra_args=args.envoy_args)


async def cmd_dev(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    from driftlock_cli.devstack import run_dev_stack

    await run_dev_stack(
        settings,
        backend=args.backend,
        state_dir=args.state_dir or settings.dev_state_dir,
        reset=args.reset,
        tls=args.tls,
    )


# --- the parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run and operate the DriftLock API gateway.")
    parser.add_argument("--json", dest="json_global", action="store_true", help="print one JSON object")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    def leaf(
        group: "argparse._SubParsersAction[_Parser]", name: str, handler: CommandHandler, help_text: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        sub.set_defaults(handler=handler)
        return sub

    leaf(commands, "migrate", cmd_migrate, "apply the schema (idempotent) and seed the free plan")

    plans_group = commands.add_parser("plans", help="manage plans").add_subparsers(
        dest="plans_command", metavar="ACTION", required=True
    )
    upsert = leaf(plans_group, "upsert", cmd_plans_upsert, "create a plan, or update it (options not given are kept)")
    upsert.add_argument("name")
    upsert.add_argument("--included-units", type=arguments.whole_number, required=True, metavar="N")
    upsert.add_argument(
        "--stripe-price",
        action="append",
        metavar="PRICE_ID",
        help="Stripe price id that selects this plan (repeatable; the given set replaces the plan's)",
    )
    upsert.add_argument("--overage", choices=[str(o) for o in Overage], default=plans.UNCHANGED)
    upsert.add_argument(
        "--hard-cap-percent",
        type=_percent_or_none,
        default=plans.UNCHANGED,
        metavar="P",
        help="block even a soft plan past P %% of its included units ('none' to remove)",
    )
    upsert.add_argument(
        "--rate-limit",
        type=_rps_or_none,
        default=plans.UNCHANGED,
        metavar="RPS",
        help="requests per second per key ('none' to remove)",
    )
    upsert.add_argument(
        "--stripe-meter",
        type=_meter_or_none,
        default=plans.UNCHANGED,
        metavar="EVENT_NAME",
        help="report the plan's billable units to the Stripe meter with this event_name ('none' to stop)",
    )
    upsert.add_argument(
        "--test-units",
        type=arguments.whole_number,
        default=plans.UNCHANGED,
        metavar="N",
        help="units per period the organisation's test keys may use, never billed (default 1000)",
    )
    upsert.add_argument(
        "--test-rate-limit",
        type=_positive_rps,
        default=plans.UNCHANGED,
        metavar="RPS",
        help="requests per second for all of an organisation's test keys together (default 5)",
    )
    leaf(plans_group, "list", cmd_plans_list, "list plans")

    orgs_group = commands.add_parser("orgs", help="manage organisations").add_subparsers(
        dest="orgs_command", metavar="ACTION", required=True
    )
    create = leaf(orgs_group, "create", cmd_orgs_create, "create an organisation")
    create.add_argument("name")
    create.add_argument("--plan", default=FREE_PLAN)
    for name, handler, help_text in (
        ("show", cmd_orgs_show, "show an organisation and its billing state"),
        ("suspend", _cmd_orgs_suspension(True), "suspend: every key of the organisation answers org_suspended"),
        ("resume", _cmd_orgs_suspension(False), "lift a suspension"),
    ):
        leaf(orgs_group, name, handler, help_text).add_argument("org_id", type=arguments.org_id)

    keys_group = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", metavar="ACTION", required=True
    )
    kcreate = leaf(keys_group, "create", cmd_keys_create, "create an API key (its secret is shown only now)")
    arguments.add_org_option(kcreate, None, required=True)
    kcreate.add_argument("--name")
    kcreate.add_argument("--scopes", type=arguments.scopes, default=keys.ALL_SCOPES, metavar="detect,ingest,read")
    kcreate.add_argument("--expires-in", type=arguments.duration, metavar="DURATION", help="e.g. 90s, 15m, 12h, 30d")
    kcreate.add_argument("--test", action="store_true", help="a dlk_test_ key: never metered nor counted")
    klist = leaf(keys_group, "list", cmd_keys_list, "list an organisation's keys (never their secrets)")
    arguments.add_org_option(klist, None, required=True)
    leaf(keys_group, "revoke", cmd_keys_revoke, "revoke a key on every authz replica").add_argument(
        "key_id", type=arguments.key_id
    )
    leaf(keys_group, "usage", cmd_keys_usage, "a key's usage this billing period").add_argument(
        "key_id", type=arguments.key_id
    )

    usage_command = leaf(commands, "usage", cmd_usage, "usage of a billing period, pooled over products")
    usage_command.add_argument("org_id", type=_org_id_or_history, metavar="ORG_ID | history ORG_ID")
    history_commands.add_history_arguments(usage_command)  # usage history
    usage_command.add_argument(
        "--period",
        choices=[str(w) for w in usage.Which],
        default=str(usage.Which.CURRENT),
        help="the current billing period (default), or the closed one before it",
    )
    alerts_group = commands.add_parser("alerts", help="usage-threshold alerts").add_subparsers(
        dest="alerts_command", metavar="ACTION", required=True
    )
    leaf(alerts_group, "list", cmd_alerts_list, "alerts raised for an organisation (70, 90, 100 %)").add_argument(
        "--org", type=arguments.org_id, required=True, metavar="ORG_ID"
    )
    audit_group = commands.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", metavar="ACTION", required=True
    )
    history_commands.add_audit_list(audit_group, leaf, cmd_audit_list)
    leaf(audit_group, "prune", cmd_audit_prune, "delete audit entries older than a given age").add_argument(
        "--older-than", type=arguments.duration, required=True, metavar="DURATION", help="e.g. 90d"
    )

    retention_commands.register(commands, leaf)
    doctor.register(commands, leaf)
    authz = leaf(commands, "authz", cmd_authz, "run the ext_authz gRPC service")
    authz.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="processes sharing the gRPC port through SO_REUSEPORT, each with its own caches and meter, under one "
        "parent that serves their metrics together (default $DRIFTLOCK_AUTHZ_WORKERS or 1: one process, no parent)",
    )
    # How the parent starts each worker: which one it is, and the pipe it reports on.
    authz.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    authz.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    webhook_commands.register(commands, leaf)
    management_commands.register(commands, leaf, keys_group=keys_group, orgs_group=orgs_group)
    event_commands.register(commands, leaf)  # events to the product (issue 19)
    control_commands.register(keys_group, orgs_group, plans_group, leaf)  # customer controls (issue 20)
    envoy = leaf(commands, "envoy", cmd_envoy, "render envoy/envoy.yaml from the environment and run Envoy")
    envoy.add_argument("--print-config", action="store_true", help="print the rendered config and exit")
    envoy.add_argument("envoy_args", nargs=argparse.REMAINDER, help="passed to envoy after --")
    dev = leaf(commands, "dev", cmd_dev, "run the whole stack on this machine")
    dev.add_argument(
        "--backend",
        type=arguments.host_port("--backend"),
        metavar="HOST:PORT",
        help="forward to this backend instead of the demo backend",
    )
    dev.add_argument(
        "--state-dir",
        help="where the embedded database and generated secrets are kept (default $DRIFTLOCK_DEV_DIR or .driftlock)",
    )
    dev.add_argument(
        "--reset",
        action="store_true",
        help="start from a clean slate: remove what earlier runs kept in the state directory (the embedded "
        "database with the demo organisation and its usage, generated secrets, spilled units)",
    )
    dev.add_argument(
        "--tls",
        action="store_true",
        help="serve the public API over HTTPS with a certificate of a local CA made in the state directory "
        "(DRIFTLOCK_TLS_CERT/KEY, when set, are used instead)",
    )
    return parser


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


# The long-running services run on uvloop where it exists (not on Windows): side by side, authz spends about
# 14 % less CPU per check on it than on asyncio's own loop (bench/README.md), and aiohttp runs on it as well.
SERVICE_COMMANDS = frozenset({"authz", "webhooks"})


def run_event_loop(main: Coroutine[Any, Any, None], *, serving: bool) -> None:
    if serving:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _uses_dev_stack_settings(args: argparse.Namespace) -> bool:
    """Operator commands take what a dev stack running in this checkout chose; the services never do."""
    if args.command in dev_state.COMMANDS_THAT_IGNORE_IT:
        return args.command == "webhooks" and getattr(args, "webhooks_command", None) is not None
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Printer(as_json=getattr(args, "json", False) or args.json_global)
    settings = None
    if _uses_dev_stack_settings(args):
        dev_state.adopt_for_this_process()
    try:
        # doctor reports a malformed setting as one of its checks instead of stopping at it.
        settings = Settings() if getattr(args, "reads_settings_itself", False) else Settings.from_env()
        run_event_loop(args.handler(args, settings, out), serving=args.command in SERVICE_COMMANDS)
    except KeyboardInterrupt:
        return 130
    except _ExitQuietly as done:
        return done.code
    except doctor.Unhealthy:
        return EXIT_ERROR  # the report, printed already, names every problem
    except OperatorError as error:
        return _fail(str(error))
    except asyncpg.UndefinedTableError:
        return _fail(f"the database has no driftlock schema yet; run `{PROG} migrate` first")
    except asyncpg.PostgresError as error:
        return _fail(f"the database refused the change: {error}")
    except Exception as error:  # a bug, not a user mistake: still one line, the trace only on request
        if settings is not None and settings.debug:
            traceback.print_exc()
        return _fail(f"internal error ({type(error).__name__}: {error}); set DRIFTLOCK_DEBUG=1 for details", 70)
    return 0


if __name__ == "__main__":
    sys.exit(main())
