"""Every Prometheus object of the authz service. Label values come from closed enums, never from a request."""

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from authz_service.check.decision import DenyCode
from authz_service.check.grants import CacheResult, GrantStore
from driftlock_kernel import retention


class CheckStats(Collector):
    """The counters every check updates: checks by decision and code, check duration, key cache results.

    Kept as plain integers by the check path and turned into Prometheus families only when scraped:
    prometheus_client's Counter and Histogram take a lock on every update, which costs a check here more than
    the rest of its bookkeeping together. Updated from the event loop only; a scrape (another thread) reads
    integers, which the GIL keeps whole.
    """

    BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
    OUTCOMES: tuple[tuple[str, str], ...] = (("allow", "ok"), *(("deny", code.value) for code in DenyCode))

    def __init__(self) -> None:
        self.checks = [0] * len(self.OUTCOMES)
        # Per bucket (not cumulative; the last one is +Inf), and the sum of the observed durations.
        self.duration_counts = [0] * (len(self.BUCKETS) + 1)
        self.duration_sum = 0.0
        self.cache_events = dict.fromkeys(CacheResult, 0)

    def index_of(self, code: DenyCode | None) -> int:
        """The slot of `checks` for a check that ended with `code` (None: allowed)."""
        return self.OUTCOMES.index(("allow", "ok") if code is None else ("deny", code.value))

    def observe(self, outcome: int, seconds: float) -> None:
        self.checks[outcome] += 1
        self.duration_counts[bisect_left(self.BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def cache_event(self, result: CacheResult) -> None:
        self.cache_events[result] += 1

    def collect(self) -> Iterator[Metric]:
        checks = CounterMetricFamily(
            "driftlock_authz_checks",
            "ext_authz checks answered, by decision and contract code ('ok' when allowed).",
            labels=["decision", "code"],
        )
        for (decision, code), count in zip(self.OUTCOMES, list(self.checks), strict=True):
            checks.add_metric([decision, code], count)
        yield checks
        counts, cumulative, buckets = list(self.duration_counts), 0, []
        for bound, count in zip((*self.BUCKETS, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        duration = HistogramMetricFamily(
            "driftlock_authz_check_duration_seconds",
            "Time to answer one ext_authz check, measured inside the service.",
        )
        duration.add_metric([], buckets, sum_value=self.duration_sum)
        yield duration
        events = CounterMetricFamily(
            "driftlock_authz_cache_events",
            "Key cache look-ups by result: hit, negative_hit, miss, coalesced, stale, error, rationed.",
            labels=["result"],
        )
        for result, count in list(self.cache_events.items()):
            events.add_metric([result.value], count)
        yield events


CHECK_STATS = CheckStats()
REGISTRY.register(CHECK_STATS)


KEY_CACHE_ENTRIES = Gauge(
    "driftlock_authz_key_cache_entries",
    "Keys in this replica's cache: verified (at most DRIFTLOCK_KEY_CACHE_MAX_ENTRIES) and unknown, keys that no "
    "database holds (at most DRIFTLOCK_KEY_CACHE_UNKNOWN_MAX_ENTRIES).",
    ["cache"],
)


def watch_key_cache(store: GrantStore) -> None:
    """Report the cache's sizes, read at scrape time rather than kept up to date on every check."""
    KEY_CACHE_ENTRIES.labels(cache="verified").set_function(lambda: store.verified_entries)
    KEY_CACHE_ENTRIES.labels(cache="unknown").set_function(lambda: store.unknown_entries)


INVALIDATIONS = Counter(
    "driftlock_authz_invalidations_total",
    "Cache invalidations received from the database, by table.",
    ["table"],
)
LISTENER_CONNECTED = Gauge(
    "driftlock_authz_invalidation_listener_up",
    "1 while the LISTEN connection that carries invalidations is up.",
)
UNAUTHENTICATED_CALLS = Counter(
    "driftlock_authz_unauthenticated_calls_total",
    "Check calls refused because they did not carry the ext_authz secret (anything but the gateway's Envoy).",
)
ROUTE_ERRORS = Counter(
    "driftlock_authz_route_config_errors_total",
    "Checks refused because the route's context_extensions were missing or malformed.",
)

# --- metering -------------------------------------------------------------------------------------------------
# org_id labels are bounded by the number of organisations; with DRIFTLOCK_METRICS_ORG_LABELS=false they are
# left empty, which Prometheus treats as no label at all.

USAGE_UNITS = Counter(
    "driftlock_usage_units_total",
    "Billable units this replica stored (live keys, billable routes, and backend reports).",
    ["org_id", "product"],
)
USAGE_QUOTA_RATIO = Gauge(
    "driftlock_usage_quota_ratio",
    "Pooled usage this billing period over the plan's included units, as last seen by this replica.",
    ["org_id"],
)
USAGE_ALERTS = Counter(
    "driftlock_usage_alerts_total",
    "Usage alerts raised by this replica (each alert is raised by exactly one replica).",
    ["threshold"],
)
USAGE_REFUNDED_UNITS = Counter(
    "driftlock_usage_refunded_units_total",
    "Billable units taken back because the backend failed the call (5xx, upstream timeout, reset or connection "
    "failure, or a global rate-limit refusal), as stored by this replica's flushes.",
    ["product"],
)
ACCESS_LOG_ENTRIES = Counter(
    "driftlock_access_log_entries_total",
    "Access log entries Envoy streamed to this replica, by result: refunded, charged (the call counts), "
    "not_billed (no billing metadata), duplicate (refunded already), disabled (refunds are switched off).",
    ["result"],
)
METER_PENDING_UNITS = Gauge(
    "driftlock_meter_pending_units",
    "Units counted by this replica and not yet acknowledged by the database.",
)
METER_FLUSHES = Counter(
    "driftlock_meter_flushes_total",
    "Flushes of counted units, by outcome: applied, duplicate (found applied after a lost acknowledgement), failed.",
    ["outcome"],
)
METER_FLUSH_DURATION = Histogram(
    "driftlock_meter_flush_duration_seconds",
    "Time of one flush statement.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
METER_DUPLICATE_REQUESTS = Counter(
    "driftlock_meter_duplicate_requests_total",
    "Billable checks not counted because their request id was counted already.",
)
DB_QUERIES = Counter(
    "driftlock_authz_db_queries_total",
    "Statements authz sent to the database, by purpose.",
    ["query"],
)
ALERT_DELIVERIES = Counter(
    "driftlock_alert_webhook_deliveries_total",
    "Attempts to POST usage alerts to DRIFTLOCK_ALERT_WEBHOOK_URL, by outcome: delivered, retry, gave_up.",
    ["outcome"],
)
# Events to the product (authz_service/events/delivery.py).
EVENT_DELIVERIES = Counter(
    "driftlock_event_deliveries_total",
    "Attempts to deliver events to endpoints, by outcome: delivered, retry, gave_up.",
    ["outcome"],
)
EVENT_DELIVERY_LAG = Histogram(
    "driftlock_event_delivery_lag_seconds",
    "From an event's occurrence to its acknowledged delivery.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
AUDIT_WRITTEN = Counter("driftlock_audit_entries_written_total", "Audit log entries written.")
AUDIT_DENIALS_COUNTED = Counter(
    "driftlock_audit_denials_counted_total",
    "Denials stored as counts (driftlock.audit_denials): per minute, source and code for those naming no known "
    "key, per minute, key and code for a known key's after the first.",
)
REFUSALS_FROM_MEMORY = Counter(
    "driftlock_authz_refusals_from_memory_total",
    "Checks of a known key answered with a refusal remembered until it can change (rate limit, quota).",
)
AUDIT_DROPPED = Counter(
    "driftlock_audit_entries_dropped_total",
    "Audit log entries dropped because the queue was full (the database was slow or down).",
)

# --- the management API and UsageService -------------------------------------------------------------------

MANAGEMENT_CALLS = Counter(
    "driftlock_management_calls_total",
    "Calls to the management API and UsageService, by method and gRPC status code.",
    ["method", "code"],
)
KEY_LAST_USED_WRITES = Counter(
    "driftlock_key_last_used_writes_total",
    "Batches of keys' last-use times written, by outcome: written, failed (kept for the next batch).",
    ["outcome"],
)

# --- shared rate limits (DRIFTLOCK_REDIS_URL) -------------------------------------------------------------------

RATE_LIMIT_FALLBACKS = Counter(
    "driftlock_rate_limit_fallbacks_total",
    "Rate-limit decisions made with this replica's own buckets because Redis could not be used, by reason: "
    "timeout, error, backoff (Redis failed within the last second and is not asked meanwhile).",
    ["reason"],
)
# Registered only by a replica configured with Redis (expose_redis_state), so that a replica without Redis
# exports no 0 that an alert would read as "Redis is down".
RATE_LIMIT_REDIS_UP = Gauge(
    "driftlock_rate_limit_redis_up",
    "1 while rate limits are shared through Redis, 0 while this replica limits on its own (absent without Redis).",
    registry=None,
)


_exposed: set[str] = set()


def expose_redis_state() -> None:
    if "redis" not in _exposed:
        REGISTRY.register(RATE_LIMIT_REDIS_UP)
        _exposed.add("redis")


# --- retention ---------------------------------------------------------------------------------------------------

# Defined in the kernel: the webhook service exports them too, for the table it prunes.
RETENTION_PRUNED = retention.PRUNED_ROWS
RETENTION_RUNS = retention.RUNS
