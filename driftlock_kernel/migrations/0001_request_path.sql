-- The request path: plans, organisations, API keys, and the NOTIFY that tells every authz replica to forget
-- what it cached. Everything lives in its own schema, not `public`, which Supabase exposes over its REST API.

CREATE TABLE driftlock.plans (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    included_units    bigint NOT NULL CHECK (included_units >= 0),
    overage           text NOT NULL DEFAULT 'soft' CHECK (overage IN ('soft', 'block')),
    hard_cap_percent  integer CHECK (hard_cap_percent > 0),
    rate_limit_rps    double precision CHECK (rate_limit_rps > 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Stripe price ids that select a plan when a subscription names them.
CREATE TABLE driftlock.plan_prices (
    stripe_price_id   text PRIMARY KEY,
    plan_name         text NOT NULL REFERENCES driftlock.plans (name) ON UPDATE CASCADE ON DELETE CASCADE
);
CREATE INDEX plan_prices_plan_name_idx ON driftlock.plan_prices (plan_name);

CREATE TABLE driftlock.organizations (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                   text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    plan_name              text NOT NULL DEFAULT 'free' REFERENCES driftlock.plans (name) ON UPDATE CASCADE,
    suspended_at           timestamptz,
    -- 'none' until Stripe reports a subscription; otherwise Stripe's subscription status.
    billing_status         text NOT NULL DEFAULT 'none' CHECK (billing_status IN (
                               'none', 'incomplete', 'incomplete_expired', 'trialing', 'active',
                               'past_due', 'unpaid', 'canceled', 'paused')),
    past_due_since         timestamptz,
    stripe_customer_id     text UNIQUE,
    stripe_subscription_id text UNIQUE,
    -- The Stripe subscription's current period; NULL means the calendar month (UTC).
    period_start           timestamptz,
    period_end             timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CHECK ((period_start IS NULL) = (period_end IS NULL) AND (period_start IS NULL OR period_start < period_end))
);
CREATE INDEX organizations_plan_name_idx ON driftlock.organizations (plan_name);

CREATE TABLE driftlock.api_keys (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id          uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    name            text CHECK (length(name) <= 200),
    -- SHA-256 of the whole key; the key itself is never stored.
    key_hash        bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    display_prefix  text NOT NULL,
    environment     text NOT NULL CHECK (environment IN ('live', 'test')),
    scopes          text[] NOT NULL CHECK (cardinality(scopes) > 0
                                           AND scopes <@ ARRAY['detect', 'ingest', 'read']::text[]),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_org_id_idx ON driftlock.api_keys (org_id);

-- Push invalidation. A trigger, not application code, sends these, so a change made in plain SQL or in
-- Supabase's dashboard reaches the caches too. NOTIFY is delivered at commit, and only then.
-- TG_ARGV[0] names the row's key column.
CREATE FUNCTION driftlock.notify_invalidate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
BEGIN
    PERFORM pg_notify('driftlock_invalidate',
                      json_build_object('table', TG_TABLE_NAME, 'id', changed ->> TG_ARGV[0])::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_invalidate AFTER INSERT OR UPDATE OR DELETE ON driftlock.api_keys
    FOR EACH ROW EXECUTE FUNCTION driftlock.notify_invalidate('id');
CREATE TRIGGER organizations_invalidate AFTER UPDATE OR DELETE ON driftlock.organizations
    FOR EACH ROW EXECUTE FUNCTION driftlock.notify_invalidate('id');
CREATE TRIGGER plans_invalidate AFTER UPDATE OR DELETE ON driftlock.plans
    FOR EACH ROW EXECUTE FUNCTION driftlock.notify_invalidate('name');
