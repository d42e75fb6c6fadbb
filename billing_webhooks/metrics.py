"""Every Prometheus object of the webhook service. Label values come from closed sets, never from a request:
event types outside the handled set count as "other", API versions outside a known list as "other"."""

from prometheus_client import Counter, Gauge, Histogram

from billing_webhooks.inbox.decisions import Problem

EVENTS = Counter(
    "driftlock_webhook_events_total",
    "Signed Stripe events received, by type (handled types, else 'other') and outcome "
    "(applied, deferred, ignored, skipped_stale, failed, duplicate).",
    ["type", "outcome"],
)
SIGNATURE_FAILURES = Counter(
    "driftlock_webhook_signature_failures_total",
    "Deliveries refused with 400 because Stripe-Signature did not verify against any configured secret, by "
    "reason: missing, malformed, mismatch (wrong secret or altered body), expired (older than 300 s).",
    ["reason"],
)
REJECTED = Counter(
    "driftlock_webhook_rejected_total",
    "Deliveries refused before any signature check or after it for their body: too_large (413), malformed_body "
    "(400), body_timeout (408).",
    ["reason"],
)
NOT_STORED = Counter(
    "driftlock_webhook_not_stored_total",
    "Verified events answered with 503 because the database could not store them (Stripe retries them).",
)
PROBLEMS = Counter(
    "driftlock_webhook_problems_total",
    "Events that need an operator's eye, by problem: malformed_org_id, unknown_org, unknown_price, "
    "customer_conflict, malformed_event, handler_error.",
    ["problem"],
)
API_VERSIONS = Counter(
    "driftlock_webhook_api_versions_total",
    "Signed events by the API release they are rendered in: acacia, basil, clover, dahlia, endive, legacy "
    "(dated versions before 2024-09-30), none, other.",
    ["release"],
)
HANDLING_DURATION = Histogram(
    "driftlock_webhook_handling_duration_seconds",
    "Time from a delivery's arrival to its answer, for signed events (storing and applying included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# Closed label sets start at 0, so that a rate() or an alert on them works before the first occurrence.
for _reason in ("missing", "malformed", "mismatch", "expired"):
    SIGNATURE_FAILURES.labels(reason=_reason)
for _reason in ("too_large", "malformed_body", "body_timeout"):
    REJECTED.labels(reason=_reason)
for _problem in Problem:
    PROBLEMS.labels(problem=_problem.value)

# --- usage to Stripe, and stripe sync ------------------------------------------------------------------------

EXPORT_UNITS = Counter(
    "driftlock_stripe_export_units_total",
    "Units of usage-export rows that reached a final state, by outcome: sent (Stripe has them), failed (Stripe "
    "refused them; they are included again in a later row once the cause is fixed), skipped (never sent: the "
    "period's invoice was final, or an old attempt could not be confirmed).",
    ["outcome"],
)
EXPORT_LAG = Gauge(
    "driftlock_stripe_export_lag_units",
    "Counted billable units of metered organisations that Stripe does not have yet (as of this replica's last "
    "decision pass; skipped units excluded).",
)
EXPORT_ATTEMPTS = Counter(
    "driftlock_stripe_export_attempts_total",
    "Meter event calls and reconciliations, by result: accepted, duplicate (Stripe had it already), no_answer, "
    "rate_limited, in_progress, server_error, unauthorized, rejected, confirmed, absent, ambiguous.",
    ["result"],
)
SYNC_RUNS = Counter(
    "driftlock_stripe_sync_runs_total",
    "Runs of stripe sync by this replica, by outcome: completed, failed.",
    ["outcome"],
)
SYNC_CHANGES = Counter(
    "driftlock_stripe_sync_changes_total",
    "Subscriptions stripe sync found different at Stripe and applied.",
)
SYNC_ERRORS = Counter(
    "driftlock_stripe_sync_errors_total",
    "Organisations whose subscriptions stripe sync could not read or apply.",
)

for _outcome in ("sent", "failed", "skipped"):
    EXPORT_UNITS.labels(outcome=_outcome)
for _outcome in ("completed", "failed"):
    SYNC_RUNS.labels(outcome=_outcome)
