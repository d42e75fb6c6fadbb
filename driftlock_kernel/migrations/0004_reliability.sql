-- Correctness under faults (issue 8): the status history of each Stripe subscription, so that dunning does not
-- depend on the order events are delivered in.

-- Every event's word on a subscription's status: a subscription event's status, or an invoice payment's
-- result. The subscription's status, past_due_since and status position (stripe_subscriptions.status*) are the
-- fold of these rows in position order (billing_webhooks.decisions.status_from_history), so a failed payment
-- that arrives after a later one still starts the overdue episode at its own time.
CREATE TABLE driftlock.stripe_subscription_history (
    subscription_id    text NOT NULL REFERENCES driftlock.stripe_subscriptions (id) ON DELETE CASCADE,
    event_id           text NOT NULL,
    at                 timestamptz NOT NULL,
    rank               smallint NOT NULL,
    status             text CHECK (status IN (
                           'incomplete', 'incomplete_expired', 'trialing', 'active',
                           'past_due', 'unpaid', 'canceled', 'paused')),
    payment_succeeded  boolean,
    received_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, event_id),
    CONSTRAINT stripe_subscription_history_one_kind CHECK (num_nulls(status, payment_succeeded) = 1)
);

-- Subscriptions stored before this history existed: their current status (and the start of an overdue
-- episode) become its first reports, so the fold starts from what was known.
INSERT INTO driftlock.stripe_subscription_history (subscription_id, event_id, at, rank, status)
SELECT id, status_event_id, status_at, status_rank, status
FROM driftlock.stripe_subscriptions
WHERE status IS NOT NULL AND status_at IS NOT NULL;
INSERT INTO driftlock.stripe_subscription_history (subscription_id, event_id, at, rank, status)
SELECT id, 'migrated:past_due_since:' || id, past_due_since, 3, 'past_due'
FROM driftlock.stripe_subscriptions
WHERE status IN ('past_due', 'unpaid') AND past_due_since IS NOT NULL AND past_due_since < status_at
ON CONFLICT DO NOTHING;

-- Exact block caps across replicas. The pooled usage of an organisation in a billing period, kept equal to the
-- sum of its usage_counters rows by every statement that writes them (the meter's flush and its reservation,
-- authz_service/meter_store.py): anything else that changes usage_counters must change this row by the same
-- amount in the same transaction. Near a cap, authz counts a call only through a conditional update of this
-- row, which serialises replicas on it.
CREATE TABLE driftlock.usage_totals (
    org_id        uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    -- No lower bound, as usage_counters has none (0005): a refund may reach the database before its unit.
    units         bigint NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period_start)
);
INSERT INTO driftlock.usage_totals (org_id, period_start, units)
SELECT org_id, period_start, sum(units) FROM driftlock.usage_counters GROUP BY org_id, period_start;

-- Test keys (dlk_test_) get an allowance and a rate limit of their own per organisation, set per plan: enough
-- to try the API, never billed. Their usage is kept apart from live usage, in tables nothing bills from (Stripe
-- export and the usage totals read usage_counters only), with the same flush and reservation statements.
ALTER TABLE driftlock.plans
    ADD COLUMN test_included_units  bigint NOT NULL DEFAULT 1000 CHECK (test_included_units >= 0),
    ADD COLUMN test_rate_limit_rps  double precision NOT NULL DEFAULT 5 CHECK (test_rate_limit_rps > 0);

CREATE TABLE driftlock.test_usage_counters (
    org_id        uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    product       text NOT NULL CHECK (product ~ '^[a-z][a-z0-9_]{0,31}$'),
    units         bigint NOT NULL CHECK (units >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period_start, product)
);
CREATE TABLE driftlock.test_usage_totals (
    org_id        uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    units         bigint NOT NULL CHECK (units >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period_start)
);

-- Usage alerts are delivered from these rows until the receiver acknowledges them or they expire, across
-- restarts and replicas: a replica claims due rows (FOR UPDATE SKIP LOCKED) and moves their next attempt a
-- lease ahead, so one replica at a time sends an alert (authz_service/alerts.py).
ALTER TABLE driftlock.usage_alerts
    ADD COLUMN webhook_next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN webhook_last_error      text,
    ADD COLUMN webhook_expired_at      timestamptz;
DROP INDEX driftlock.usage_alerts_undelivered_idx;
CREATE INDEX usage_alerts_due_idx ON driftlock.usage_alerts (webhook_next_attempt_at)
    WHERE webhook_delivered_at IS NULL AND webhook_expired_at IS NULL;
