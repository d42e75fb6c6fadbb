"""One configuration surface: every variable read by Settings, each default written once."""

import dataclasses
import re
from pathlib import Path

import pytest

from driftlock_kernel import settings as settings_module
from driftlock_kernel.settings import HostPort, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def test_an_empty_environment_gives_the_defaults_of_the_dataclass():
    assert Settings.from_env({}) == Settings()


def test_each_variable_is_read():
    settings = Settings.from_env(
        {
            "DRIFTLOCK_DB_TRANSACTION_POOLER": "true",
            "DRIFTLOCK_FALLBACK_PLAN": "starter",
            "DRIFTLOCK_AUTHZ_ADDRESS": "10.0.0.1:9191, 10.0.0.2:9191",
            "DRIFTLOCK_WEBHOOKS_ADDRESS": "webhooks:8081",
            "DRIFTLOCK_ENVOY_HOST": "127.0.0.1",
            "DRIFTLOCK_ENVOY_CONFIG": "/etc/envoy.yaml",
            "DRIFTLOCK_ENVOY_BIN": "/usr/bin/envoy",
            "DRIFTLOCK_ENVOY_LOG_LEVEL": "info",
            "DRIFTLOCK_ENVOY_CONCURRENCY": "3",
            "DRIFTLOCK_LOG_LEVEL": "debug",
            "DRIFTLOCK_DEBUG": "1",
            "DRIFTLOCK_DEV_DIR": "/tmp/dev",
            "STRIPE_API_KEY": "rk_live_abc",
            "STRIPE_API_BASE": "http://127.0.0.1:12111/",
            "DRIFTLOCK_STRIPE_EXPORT_INTERVAL_SECONDS": "5",
            "DRIFTLOCK_STRIPE_SETTLE_SECONDS": "30",
            "DRIFTLOCK_STRIPE_FINALIZATION_GRACE_SECONDS": "7200",
            "DRIFTLOCK_STRIPE_TIMEOUT_SECONDS": "3",
            "DRIFTLOCK_STRIPE_SYNC_INTERVAL_SECONDS": "600",
            "DRIFTLOCK_REFUND_FAILED_CALLS": "false",
            "DRIFTLOCK_AUTHZ_WORKERS": "4",
        }
    )
    assert settings.authz_workers == 4
    assert settings.database_transaction_pooler is True
    assert settings.billing_policy().fallback_plan == "starter"
    assert settings.envoy_authz_addresses() == (HostPort("10.0.0.1", 9191), HostPort("10.0.0.2", 9191))
    assert settings.envoy_webhooks_address() == HostPort("webhooks", 8081)
    assert (settings.envoy_host, settings.envoy_config_path, settings.envoy_binary) == (
        "127.0.0.1",
        "/etc/envoy.yaml",
        "/usr/bin/envoy",
    )
    assert (settings.envoy_log_level, settings.envoy_concurrency) == ("info", 3)
    assert (settings.log_level, settings.debug, settings.dev_state_dir) == ("DEBUG", True, "/tmp/dev")
    assert (settings.require_stripe_api_key(), settings.stripe_api_base) == ("rk_live_abc", "http://127.0.0.1:12111")
    assert (settings.stripe_export_interval_seconds, settings.stripe_settle_seconds) == (5.0, 30.0)
    assert (settings.stripe_finalization_grace_seconds, settings.stripe_timeout_seconds) == (7200.0, 3.0)
    assert (settings.stripe_sync_interval_seconds, settings.refund_failed_calls) == (600.0, False)


def test_the_stripe_key_is_checked_where_it_is_needed_and_never_shown():
    settings = Settings.from_env({"STRIPE_API_KEY": "pk_live_secretish"})
    with pytest.raises(SettingsError) as caught:
        settings.require_stripe_api_key()
    assert "pk_live_secretish" not in str(caught.value)
    assert "pk_live_secretish" not in repr(settings)
    with pytest.raises(SettingsError, match="STRIPE_API_KEY is not set"):
        Settings.from_env({}).require_stripe_api_key()


# Every secret Settings reads, each with a value found nowhere else in a repr of Settings.
SECRET_ENVIRONMENT = {
    "DATABASE_URL": "postgresql://gateway:db-password-7f3a@db.example:5432/driftlock",
    "DATABASE_LISTEN_URL": "postgresql://gateway:listen-password-91c2@db.example:5432/driftlock",
    "DRIFTLOCK_JWT_SECRET": "jwt-secret-5b8e1d4c9a7f2e6b3d0c8a1f4e7b2d9c",
    "STRIPE_WEBHOOK_SECRET": "whsec_webhook-one-3c9e7a1b5d2f8e4c, whsec_webhook-two-8d2b6f0a4e9c1d7b",
    "DRIFTLOCK_ADMIN_TOKEN_SECRET": "admin-secret-2e7c9b4a1f8d3e6c0b5a9d2f7e4c1b8a",
    "DRIFTLOCK_CONTEXT_SIGNING_KEYS": "current:c2lnbmluZy1rZXktb25lLTRhOGMyZTZi,next:c2lnbmluZy1rZXktdHdvLTdkMWY5YjNl",
    "DRIFTLOCK_EXT_AUTHZ_SECRET": "ext-authz-secret-6a1d8c3f9e2b7a4d0c5e8b1f3a6d9c2e",
    "DRIFTLOCK_ALERT_WEBHOOK_URL": "https://hooks.example/services/T000/B000/alert-url-token-4f7a2c9e",
    "DRIFTLOCK_ALERT_WEBHOOK_SECRET": "alert-secret-one-9c4e1a7d3b8f2e6c0a5d, alert-secret-two-1e8b5d2a9f6c3e0b7d4a",
    "STRIPE_API_KEY": "rk_live_stripe-api-key-0b7e4a1d8c5f2e9b",
    "DRIFTLOCK_REDIS_URL": "redis://:redis-password-3d9a6c2f@redis.example:6379/0",
}
SECRET_PARTS = [
    "db-password-7f3a",
    "listen-password-91c2",
    "jwt-secret-5b8e1d4c9a7f2e6b3d0c8a1f4e7b2d9c",
    "webhook-one-3c9e7a1b5d2f8e4c",
    "webhook-two-8d2b6f0a4e9c1d7b",
    "admin-secret-2e7c9b4a1f8d3e6c0b5a9d2f7e4c1b8a",
    "c2lnbmluZy1rZXktb25lLTRhOGMyZTZi",
    "c2lnbmluZy1rZXktdHdvLTdkMWY5YjNl",
    "ext-authz-secret-6a1d8c3f9e2b7a4d0c5e8b1f3a6d9c2e",
    "alert-url-token-4f7a2c9e",
    "alert-secret-one-9c4e1a7d3b8f2e6c0a5d",
    "alert-secret-two-1e8b5d2a9f6c3e0b7d4a",
    "stripe-api-key-0b7e4a1d8c5f2e9b",
    "redis-password-3d9a6c2f",
]


def test_no_secret_appears_in_the_repr_of_settings():
    settings = Settings.from_env(SECRET_ENVIRONMENT)
    held = " ".join(str(getattr(settings, f.name)) for f in dataclasses.fields(Settings))
    assert all(part in held for part in SECRET_PARTS)  # every secret was read, so its absence below means something
    for shown in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert [part for part in SECRET_PARTS if part in shown] == []


def test_every_field_named_like_a_secret_is_kept_out_of_the_repr():
    # A new secret setting added without repr=False fails here, even before it is added to SECRET_ENVIRONMENT.
    secret_like = re.compile(r"secret|_url$|api_key|signing_keys$|password|token$")
    shown = [f.name for f in dataclasses.fields(Settings) if secret_like.search(f.name) and f.repr]
    assert shown == []


def test_service_addresses_default_to_this_hosts_ports():
    settings = Settings.from_env({"DRIFTLOCK_AUTHZ_PORT": "7000", "DRIFTLOCK_WEBHOOKS_PORT": "7001"})
    assert settings.envoy_authz_addresses() == (HostPort("127.0.0.1", 7000),)
    assert settings.envoy_webhooks_address() == HostPort("127.0.0.1", 7001)
    assert Settings.from_env({}).database_transaction_pooler is None  # guessed from the port


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DRIFTLOCK_DB_TRANSACTION_POOLER", "maybe"),
        ("DRIFTLOCK_AUTHZ_ADDRESS", "no-port"),
        ("DRIFTLOCK_AUTHZ_ADDRESS", ","),
        ("DRIFTLOCK_LOG_LEVEL", "loud"),
        ("DRIFTLOCK_ENVOY_CONCURRENCY", "-1"),
        ("STRIPE_API_BASE", "api.stripe.com"),
        ("DRIFTLOCK_STRIPE_EXPORT_INTERVAL_SECONDS", "0"),
        ("DRIFTLOCK_REFUND_FAILED_CALLS", "sometimes"),
        ("DRIFTLOCK_AUTHZ_WORKERS", "0"),
        ("DRIFTLOCK_AUTHZ_WORKERS", "65"),
        ("DRIFTLOCK_AUTHZ_WORKERS", "two"),
    ],
)
def test_a_malformed_value_is_one_line_naming_the_variable(name, value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert name in str(caught.value) and "\n" not in str(caught.value)


def test_no_module_but_settings_reads_the_environment():
    """The children's environment is passed on (supervisor.py), never read for a setting."""
    # dev_state.py lends a running dev stack's settings to the CLI beside it, before Settings reads them.
    allowed = {"driftlock_kernel/settings.py", "driftlock_cli/supervisor.py", "driftlock_cli/dev_state.py"}
    readers = []
    for package in ("driftlock_kernel", "driftlock_cli", "authz_service", "billing_webhooks"):
        for path in (ROOT / package).rglob("*.py"):
            relative = str(path.relative_to(ROOT))
            if relative not in allowed and re.search(r"os\.environ|getenv\(", path.read_text()):
                readers.append(relative)
    assert readers == []


def test_the_production_kit_settings_are_read():
    from datetime import timedelta

    settings = Settings.from_env(
        {
            "DRIFTLOCK_LOG_FORMAT": "text",
            "DRIFTLOCK_ENVOY_STATS_PORT": "9999",
            "DRIFTLOCK_TLS_CERT": "/tls/cert.pem",
            "DRIFTLOCK_TLS_KEY": "/tls/key.pem",
            "DRIFTLOCK_REDIS_URL": "redis://redis:6379/0",
            "DRIFTLOCK_REDIS_TIMEOUT_SECONDS": "0.2",
            "DRIFTLOCK_RETENTION_METER_FLUSHES": "10d",
            "DRIFTLOCK_RETENTION_USAGE_REPORTS": "off",
            "DRIFTLOCK_RETENTION_AUDIT_LOG": "30d",
            "DRIFTLOCK_RETENTION_STRIPE_EVENTS": "3d",
            "DRIFTLOCK_PRUNE_INTERVAL_SECONDS": "0",
            "STRIPE_API_KEY": "sk_test_x",
            "STRIPE_API_BASE": "http://127.0.0.1:12111",
        }
    )
    assert (settings.log_format, settings.envoy_stats_port) == ("text", 9999)
    assert settings.tls() == ("/tls/cert.pem", "/tls/key.pem")
    assert (settings.redis_url, settings.redis_timeout_seconds) == ("redis://redis:6379/0", 0.2)
    assert settings.retention_meter_flushes == timedelta(days=10)
    assert settings.retention_usage_reports is None
    assert (settings.retention_audit_log, settings.retention_stripe_events) == (timedelta(days=30), timedelta(days=3))
    assert settings.prune_interval_seconds == 0
    assert (settings.stripe_api_key, settings.stripe_api_base) == ("sk_test_x", "http://127.0.0.1:12111")
    assert Settings().tls() is None


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"DRIFTLOCK_LOG_FORMAT": "xml"}, "DRIFTLOCK_LOG_FORMAT"),
        ({"DRIFTLOCK_REDIS_URL": "http://redis"}, "DRIFTLOCK_REDIS_URL"),
        ({"DRIFTLOCK_RETENTION_STRIPE_EVENTS": "2d"}, "DRIFTLOCK_RETENTION_STRIPE_EVENTS"),
        ({"DRIFTLOCK_RETENTION_METER_FLUSHES": "12h"}, "DRIFTLOCK_RETENTION_METER_FLUSHES"),
        ({"DRIFTLOCK_RETENTION_AUDIT_LOG": "soon"}, "DRIFTLOCK_RETENTION_AUDIT_LOG"),
    ],
)
def test_malformed_production_kit_settings_name_the_variable(environ, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(environ)


def test_a_certificate_without_its_key_is_refused():
    with pytest.raises(SettingsError, match="DRIFTLOCK_TLS_KEY"):
        Settings.from_env({"DRIFTLOCK_TLS_CERT": "/tls/cert.pem"}).tls()


def test_retention_minimums_match_the_pruned_tables():
    """Settings refuse what the pruner would refuse, so a bad value stops a service at start-up, not later."""
    from driftlock_kernel.retention import TABLES, USAGE_HISTORY_RETENTION

    for name, table in TABLES.items():
        too_short = f"{table.minimum.days * 24 - 1}h"
        setting = USAGE_HISTORY_RETENTION.get(name, name)  # the key buckets follow the organisation's
        with pytest.raises(SettingsError):
            Settings.from_env({f"DRIFTLOCK_RETENTION_{setting.upper()}": too_short})


def test_an_alert_webhook_url_needs_a_signing_secret():
    import pytest

    from driftlock_kernel.settings import Settings, SettingsError

    unsigned = Settings.from_env({"DRIFTLOCK_ALERT_WEBHOOK_URL": "https://hooks.example/alerts"})
    with pytest.raises(SettingsError, match="DRIFTLOCK_ALERT_WEBHOOK_SECRET"):
        unsigned.require_alert_webhook_secrets()
    short = Settings.from_env({"DRIFTLOCK_ALERT_WEBHOOK_SECRET": "too-short"})
    with pytest.raises(SettingsError, match="32 bytes"):
        short.require_alert_webhook_secrets()
    rotating = Settings.from_env({"DRIFTLOCK_ALERT_WEBHOOK_SECRET": f"{'a' * 32}, {'b' * 32}"})
    assert rotating.require_alert_webhook_secrets() == ("a" * 32, "b" * 32)


# --- Settings declared once ---------------------------------------------------------------------------------
VARIABLE = re.compile(r"\b(?:DRIFTLOCK|DATABASE|STRIPE)_[A-Z0-9_]+\b")
# Names in the documentation that look like variables but are not settings, and what they are.
NOT_SETTINGS = {"DATABASE_ERRORS": "driftlock_kernel/db.py's tuple of database exceptions"}


def documentation_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / ".env.example", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted(ROOT.glob("docker-compose*.yml"))
    files += sorted(path for path in (ROOT / "deploy" / "kubernetes").rglob("*") if path.is_file())
    return files


def test_every_field_is_declared_once_with_a_variable_a_parser_and_a_one_line_meaning():
    declared = list(Settings.declarations())
    assert [d.attribute for d in declared] == [f.name for f in dataclasses.fields(Settings)]
    variables = [d.variable for d in declared]
    assert len(variables) == len(set(variables)), "two settings read one variable"
    for d in declared:
        assert d.section in settings_module.SECTIONS, d.attribute
        assert d.meaning and "\n" not in d.meaning, d.attribute
        assert callable(d.parse), d.attribute
    # Every section holds something, and the fields are grouped by section, in the order SECTIONS lists them.
    order = [d.section for d in declared]
    assert sorted(set(order), key=order.index) == list(settings_module.SECTIONS)
    assert order == sorted(order, key=settings_module.SECTIONS.index)


def test_from_env_is_a_short_loop_over_the_declarations():
    import inspect

    assert len(inspect.getsource(Settings.from_env).splitlines()) <= 20


@pytest.mark.parametrize(
    "environ",
    [SECRET_ENVIRONMENT, {"DRIFTLOCK_RETENTION_USAGE_REPORTS": "off", "DRIFTLOCK_DEBUG": "yes"}],
    ids=["secrets", "off"],
)
def test_what_environment_for_writes_reads_back_as_the_same_settings(environ):
    settings = Settings.from_env(environ)
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(Settings)}
    assert Settings.from_env(Settings.environment_for(**values)) == settings


def test_environment_for_writes_each_value_under_its_declared_variable():
    written = Settings.environment_for(
        authz_port=7000,
        authz_addresses=(HostPort("10.0.0.1", 9191), HostPort("10.0.0.2", 9191)),
        refund_failed_calls=False,
        retention_audit_log=None,
        stripe_settle_seconds=2.5,
    )
    settings = Settings.from_env(written)
    assert settings.authz_port == 7000
    assert settings.envoy_authz_addresses() == (HostPort("10.0.0.1", 9191), HostPort("10.0.0.2", 9191))
    assert (settings.refund_failed_calls, settings.retention_audit_log, settings.stripe_settle_seconds) == (
        False,
        None,
        2.5,
    )
    with pytest.raises(AttributeError, match="no_such_setting"):
        Settings.environment_for(no_such_setting=1)


def test_every_variable_the_documentation_names_is_declared():
    declared = {d.variable for d in Settings.declarations()}
    undeclared = {
        f"{name} ({path.relative_to(ROOT)})"
        for path in documentation_files()
        for name in VARIABLE.findall(path.read_text())
        if name not in declared and name not in NOT_SETTINGS
    }
    assert undeclared == set()


def test_every_declared_variable_is_in_env_example_once():
    """.env.example is the operator's list (the required ones first, then by topic): each variable exactly once."""
    assignments = re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), flags=re.MULTILINE)
    declared = [d.variable for d in Settings.declarations()]
    assert {name: assignments.count(name) for name in declared if assignments.count(name) != 1} == {}


def test_dev_and_its_stack_name_no_variable_by_hand():
    """What `dev` passes its children is written with Settings.environment_for, from the declarations."""
    by_hand = re.compile(r"""["'](?:DRIFTLOCK|STRIPE|DATABASE)_[A-Z0-9_]+["']""")
    for module in ("driftlock_cli/devstack.py", "driftlock_cli/stack.py"):
        assert by_hand.findall((ROOT / module).read_text()) == [], module
