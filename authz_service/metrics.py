"""Every Prometheus object of the authz service. Label values come from closed enums, never from a request."""

from prometheus_client import Counter, Gauge, Histogram

CHECKS = Counter(
    "driftlock_authz_checks_total",
    "ext_authz checks answered, by decision and contract code ('ok' when allowed).",
    ["decision", "code"],
)
CHECK_DURATION = Histogram(
    "driftlock_authz_check_duration_seconds",
    "Time to answer one ext_authz check, measured inside the service.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
CACHE_EVENTS = Counter(
    "driftlock_authz_cache_events_total",
    "Key cache look-ups by result: hit, negative_hit, miss, coalesced, stale, error.",
    ["result"],
)
INVALIDATIONS = Counter(
    "driftlock_authz_invalidations_total",
    "Cache invalidations received from the database, by table.",
    ["table"],
)
LISTENER_CONNECTED = Gauge(
    "driftlock_authz_invalidation_listener_up",
    "1 while the LISTEN connection that carries invalidations is up.",
)
ROUTE_ERRORS = Counter(
    "driftlock_authz_route_config_errors_total",
    "Checks refused because the route's context_extensions were missing or malformed.",
)
