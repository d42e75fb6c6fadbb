-- Customer controls (issue 20): a spend cap per organisation, limits per key, the products a plan or a key may
-- call, and erasure of an organisation. authz reads every column here with the key's grant (one statement per
-- key look-up, as before) and decides from memory.

-- The customer's spend cap on a soft plan: past included + max_overage_units, billable calls answer
-- spend_cap_reached until the period ends. NULL: no cap.
-- deleted_at: the organisation was erased (DELETE /v1/orgs/{id}); the row stays because usage, refunds, billing
-- periods and Stripe exports reference it (invoices need them), but it answers 404 everywhere.
ALTER TABLE driftlock.organizations
    ADD COLUMN max_overage_units bigint CHECK (max_overage_units >= 0),
    ADD COLUMN deleted_at        timestamptz;

-- The products a plan includes; NULL: all of them.
ALTER TABLE driftlock.plans
    ADD COLUMN products text[] CHECK (products IS NULL OR (cardinality(products) > 0
                                                           AND products <@ ARRAY['stream', 'monitor']::text[]));

-- Per-key limits, each NULL when not set:
-- - max_units_per_period: billable units the key may use per billing period (key_quota_exceeded past it);
-- - rate_limit_rps: replaces the plan's rate limit for this key. Set by an organisation token it may only lower
--   the plan's, and authz applies the lower of the two should the plan change later; rate_limit_above_plan marks
--   a rate an operator set, which applies as it is;
-- - allowed_cidrs: the source addresses the key may be used from (ip_not_allowed otherwise);
-- - products: the products the key may call detect on (product_not_allowed otherwise).
ALTER TABLE driftlock.api_keys
    ADD COLUMN max_units_per_period  bigint CHECK (max_units_per_period >= 0),
    ADD COLUMN rate_limit_rps        double precision CHECK (rate_limit_rps > 0),
    ADD COLUMN rate_limit_above_plan boolean NOT NULL DEFAULT false,
    ADD COLUMN allowed_cidrs         cidr[] CHECK (allowed_cidrs IS NULL OR cardinality(allowed_cidrs) BETWEEN 1 AND 100),
    ADD COLUMN products              text[] CHECK (products IS NULL OR (cardinality(products) > 0
                                                                       AND products <@ ARRAY['stream', 'monitor']::text[]));

-- Usage of the keys that have a max_units_per_period, per key and billing period, counted from when the cap was
-- set. Kept by authz's third meter with the same flush and reservation statements as the organisation's usage
-- (authz_service/usage/meter_store.py, KEY_TABLES): in these tables `org_id` holds the key's id. Nothing bills
-- from them.
CREATE TABLE driftlock.key_usage_counters (
    org_id        uuid NOT NULL REFERENCES driftlock.api_keys (id) ON DELETE CASCADE,  -- the key's id
    period_start  timestamptz NOT NULL,
    product       text NOT NULL CHECK (product ~ '^[a-z][a-z0-9_]{0,31}$'),
    -- The terms columns of usage_counters (migration 0010): the same statements write both; never billed, ''.
    plan_name          text NOT NULL DEFAULT '',
    stripe_meter       text NOT NULL DEFAULT '',
    stripe_customer_id text NOT NULL DEFAULT '',
    units         bigint NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id)
);
CREATE TABLE driftlock.key_usage_totals (
    org_id        uuid NOT NULL REFERENCES driftlock.api_keys (id) ON DELETE CASCADE,  -- the key's id
    period_start  timestamptz NOT NULL,
    units         bigint NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period_start)
);
-- A key's unit taken back when the organisation's cap refused the call after the key's reservation counted it.
CREATE TABLE driftlock.key_usage_refunds (
    request_id    text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 200),
    org_id        uuid NOT NULL REFERENCES driftlock.api_keys (id) ON DELETE CASCADE,  -- the key's id
    period_start  timestamptz NOT NULL,
    product       text NOT NULL,
    plan_name          text NOT NULL DEFAULT '',
    stripe_meter       text NOT NULL DEFAULT '',
    stripe_customer_id text NOT NULL DEFAULT '',
    units         bigint NOT NULL CHECK (units > 0),
    reason        text NOT NULL CHECK (length(reason) BETWEEN 1 AND 32),
    refunded_at   timestamptz NOT NULL DEFAULT now(),
    xid           xid8 NOT NULL DEFAULT pg_current_xact_id()
);
