-- Usage history: hour and day buckets per organisation and product, and per key, written by the meter's flush in
-- the statement that moves the usage counters (so the buckets of a billing period add up to its counters), and
-- pruned like the append-only tables (hours after 90 days, days after 2 years by default).
--
-- units: billable units net of refunds (a refund lands in the bucket of the call it takes back); refunded_units:
-- what was taken back; requests: billed calls served; denied_*: checks of a known live key refused, by family
-- of the refusal (access: 401/403, payment: 402, quota: a usage cap, rate: a rate limit, unavailable: 503).
-- A unit the backend reported through UsageService has no key: key_id is the nil UUID in the key tables.
-- No foreign key to organizations: a deleted organisation's usage stays (invoices need it), as its counters do.

-- The period is part of the key so that a period that starts within an hour still sums exactly.
CREATE TABLE driftlock.usage_hours (
    org_id              uuid NOT NULL,
    period_start        timestamptz NOT NULL,
    hour                timestamptz NOT NULL,
    product             text NOT NULL,
    units               bigint NOT NULL DEFAULT 0,
    refunded_units      bigint NOT NULL DEFAULT 0,
    requests            bigint NOT NULL DEFAULT 0,
    denied_access       bigint NOT NULL DEFAULT 0,
    denied_payment      bigint NOT NULL DEFAULT 0,
    denied_quota        bigint NOT NULL DEFAULT 0,
    denied_rate         bigint NOT NULL DEFAULT 0,
    denied_unavailable  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, hour, period_start, product)
);
CREATE INDEX usage_hours_hour_idx ON driftlock.usage_hours (hour);

CREATE TABLE driftlock.usage_days (
    org_id              uuid NOT NULL,
    day                 timestamptz NOT NULL,
    product             text NOT NULL,
    units               bigint NOT NULL DEFAULT 0,
    refunded_units      bigint NOT NULL DEFAULT 0,
    requests            bigint NOT NULL DEFAULT 0,
    denied_access       bigint NOT NULL DEFAULT 0,
    denied_payment      bigint NOT NULL DEFAULT 0,
    denied_quota        bigint NOT NULL DEFAULT 0,
    denied_rate         bigint NOT NULL DEFAULT 0,
    denied_unavailable  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, day, product)
);
CREATE INDEX usage_days_day_idx ON driftlock.usage_days (day);

-- With the period too, so that a key's usage in a period that starts within an hour is exact.
CREATE TABLE driftlock.usage_key_hours (
    org_id              uuid NOT NULL,
    period_start        timestamptz NOT NULL,
    hour                timestamptz NOT NULL,
    key_id              uuid NOT NULL,
    product             text NOT NULL,
    units               bigint NOT NULL DEFAULT 0,
    refunded_units      bigint NOT NULL DEFAULT 0,
    requests            bigint NOT NULL DEFAULT 0,
    denied_access       bigint NOT NULL DEFAULT 0,
    denied_payment      bigint NOT NULL DEFAULT 0,
    denied_quota        bigint NOT NULL DEFAULT 0,
    denied_rate         bigint NOT NULL DEFAULT 0,
    denied_unavailable  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, hour, key_id, period_start, product)
);
CREATE INDEX usage_key_hours_hour_idx ON driftlock.usage_key_hours (hour);
-- GET /v1/keys/{key_id}/usage and key listings: one key's units in a period.
CREATE INDEX usage_key_hours_key_idx ON driftlock.usage_key_hours (key_id, period_start);

CREATE TABLE driftlock.usage_key_days (
    org_id              uuid NOT NULL,
    day                 timestamptz NOT NULL,
    key_id              uuid NOT NULL,
    product             text NOT NULL,
    units               bigint NOT NULL DEFAULT 0,
    refunded_units      bigint NOT NULL DEFAULT 0,
    requests            bigint NOT NULL DEFAULT 0,
    denied_access       bigint NOT NULL DEFAULT 0,
    denied_payment      bigint NOT NULL DEFAULT 0,
    denied_quota        bigint NOT NULL DEFAULT 0,
    denied_rate         bigint NOT NULL DEFAULT 0,
    denied_unavailable  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, day, key_id, product)
);
CREATE INDEX usage_key_days_day_idx ON driftlock.usage_key_days (day);

-- GET /v1/orgs/{org_id}/audit pages through one organisation's entries, newest first.
CREATE INDEX audit_log_org_at_id_idx ON driftlock.audit_log (org_id, at DESC, id DESC);
