-- Stripe webhooks: the inbox of every event received (deduplication and audit trail), and the billing state
-- Stripe reported for each subscription. An organisation's billing columns (billing_status, past_due_since,
-- plan_name, period_start/end, trial_end, cancel_at_period_end, stripe_*_id) are derived from the subscription
-- rows linked to it.

-- What `orgs show` reports besides the status: when a trial ends, and whether the subscription ends with the
-- current period.
ALTER TABLE driftlock.organizations
    ADD COLUMN trial_end            timestamptz,
    ADD COLUMN cancel_at_period_end boolean NOT NULL DEFAULT false;

-- One row per Stripe event id. The row is inserted (ON CONFLICT DO NOTHING) and the event applied in the same
-- transaction, so a delivery either stores and applies an event or leaves nothing; a second delivery of the
-- same id finds the row and changes nothing. 'received' only exists inside that transaction.
CREATE TABLE driftlock.stripe_events (
    id            text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    type          text NOT NULL CHECK (length(type) BETWEEN 1 AND 255),
    api_version   text,
    -- Stripe's event.created: when the change happened at Stripe, not when it reached us.
    created       timestamptz NOT NULL,
    livemode      boolean NOT NULL DEFAULT false,
    payload       jsonb NOT NULL,
    outcome       text NOT NULL DEFAULT 'received' CHECK (outcome IN (
                      'received', 'applied', 'deferred', 'ignored', 'skipped_stale', 'failed')),
    -- Why: the error of a failed event, what an applied event left unchanged, what an ignored one was.
    detail        text,
    org_id        uuid REFERENCES driftlock.organizations (id) ON DELETE SET NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz
);
CREATE INDEX stripe_events_received_at_idx ON driftlock.stripe_events (received_at);
CREATE INDEX stripe_events_org_idx ON driftlock.stripe_events (org_id, type, created) WHERE org_id IS NOT NULL;

-- What Stripe last said about each subscription, with the position (event time, status rank, event id) of the
-- event each part came from, so that an older event arriving late never overwrites a newer one. The status has
-- its own position because invoice events change it too, without carrying a whole subscription.
CREATE TABLE driftlock.stripe_subscriptions (
    id                 text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    customer_id        text NOT NULL,
    -- NULL until an organisation is known for it (checkout, metadata.org_id, or the customer's organisation).
    org_id             uuid REFERENCES driftlock.organizations (id) ON DELETE SET NULL,
    -- NULL while nothing but its id is known (a checkout named it before any subscription event arrived).
    status             text CHECK (status IN (
                           'incomplete', 'incomplete_expired', 'trialing', 'active',
                           'past_due', 'unpaid', 'canceled', 'paused')),
    past_due_since     timestamptz,
    status_at          timestamptz,
    status_rank        smallint,
    status_event_id    text,
    -- From the last subscription snapshot applied (created, updated, deleted, trial_will_end).
    price_ids          text[] NOT NULL DEFAULT '{}',
    period_start       timestamptz,
    period_end         timestamptz,
    trial_end          timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    ended              boolean NOT NULL DEFAULT false,  -- customer.subscription.deleted was applied
    snapshot_at        timestamptz,
    snapshot_rank      smallint,
    snapshot_event_id  text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((period_start IS NULL) = (period_end IS NULL) AND (period_start IS NULL OR period_start < period_end))
);
CREATE INDEX stripe_subscriptions_customer_idx ON driftlock.stripe_subscriptions (customer_id);
CREATE INDEX stripe_subscriptions_org_idx ON driftlock.stripe_subscriptions (org_id) WHERE org_id IS NOT NULL;
