-- Every unit billed under the plan it was used on (issue 17).
--
-- authz records, when it counts a unit, the terms it was used under: the organisation's effective plan, that
-- plan's Stripe meter ('' when the plan reports none) and the organisation's Stripe customer ('' when none).
-- Counters, reports and refunds are kept per those terms, and the exporter reports each set of terms to its own
-- meter and customer. A plan change or a cancellation therefore starts new counters; the old ones stop growing
-- and are reported in full (billing_webhooks/usage_export/exports.py), instead of the export deciding, from the
-- organisation's plan at export time, where a whole open period goes.
--
-- '' as plan_name means "terms not recorded" (a spill file written by an older authz): the exporter sends such
-- units where it sent them before, to the organisation's current meter and customer.

-- Existing rows get the terms the exporter would have given them: the meter and customer of the period's latest
-- export row, else the organisation's current plan and customer.
CREATE FUNCTION pg_temp.terms_of(org uuid, period timestamptz, OUT plan_name text, OUT stripe_meter text,
                                 OUT stripe_customer_id text) LANGUAGE sql STABLE AS $$
    SELECT o.plan_name,
           coalesce((SELECT e.event_name FROM driftlock.stripe_exports e
                     WHERE e.org_id = org AND e.period_start = period ORDER BY e.seq DESC LIMIT 1),
                    p.stripe_meter, ''),
           coalesce((SELECT e.stripe_customer_id FROM driftlock.stripe_exports e
                     WHERE e.org_id = org AND e.period_start = period ORDER BY e.seq DESC LIMIT 1),
                    o.stripe_customer_id, '')
    FROM driftlock.organizations o LEFT JOIN driftlock.plans p ON p.name = o.plan_name
    WHERE o.id = org
$$;

ALTER TABLE driftlock.usage_counters
    ADD COLUMN plan_name          text NOT NULL DEFAULT '',
    ADD COLUMN stripe_meter       text NOT NULL DEFAULT '',
    ADD COLUMN stripe_customer_id text NOT NULL DEFAULT '';
UPDATE driftlock.usage_counters c SET (plan_name, stripe_meter, stripe_customer_id) =
    (SELECT t.plan_name, t.stripe_meter, t.stripe_customer_id FROM pg_temp.terms_of(c.org_id, c.period_start) t);
ALTER TABLE driftlock.usage_counters
    DROP CONSTRAINT usage_counters_pkey,
    ADD PRIMARY KEY (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id);

-- Test keys' usage goes through the same statements (never billed: its terms stay '').
ALTER TABLE driftlock.test_usage_counters
    ADD COLUMN plan_name          text NOT NULL DEFAULT '',
    ADD COLUMN stripe_meter       text NOT NULL DEFAULT '',
    ADD COLUMN stripe_customer_id text NOT NULL DEFAULT '',
    DROP CONSTRAINT test_usage_counters_pkey,
    ADD PRIMARY KEY (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id);

-- A refund takes its units back from the counter of the terms its call was counted under (the check hands them
-- to Envoy with the rest of what it billed).
ALTER TABLE driftlock.usage_refunds
    ADD COLUMN plan_name          text NOT NULL DEFAULT '',
    ADD COLUMN stripe_meter       text NOT NULL DEFAULT '',
    ADD COLUMN stripe_customer_id text NOT NULL DEFAULT '';
UPDATE driftlock.usage_refunds r SET (plan_name, stripe_meter, stripe_customer_id) =
    (SELECT t.plan_name, t.stripe_meter, t.stripe_customer_id FROM pg_temp.terms_of(r.org_id, r.period_start) t);

ALTER TABLE driftlock.usage_reports
    ADD COLUMN plan_name          text NOT NULL DEFAULT '',
    ADD COLUMN stripe_meter       text NOT NULL DEFAULT '',
    ADD COLUMN stripe_customer_id text NOT NULL DEFAULT '';
UPDATE driftlock.usage_reports r SET (plan_name, stripe_meter, stripe_customer_id) =
    (SELECT t.plan_name, t.stripe_meter, t.stripe_customer_id FROM pg_temp.terms_of(r.org_id, r.period_start) t);

-- The settle marks are per meter and customer, as the rows they decide.
ALTER TABLE driftlock.stripe_export_marks
    ADD COLUMN stripe_meter       text NOT NULL DEFAULT '',
    ADD COLUMN stripe_customer_id text NOT NULL DEFAULT '';
UPDATE driftlock.stripe_export_marks m SET (stripe_meter, stripe_customer_id) =
    (SELECT t.stripe_meter, t.stripe_customer_id FROM pg_temp.terms_of(m.org_id, m.period_start) t);
ALTER TABLE driftlock.stripe_export_marks
    DROP CONSTRAINT stripe_export_marks_pkey,
    ADD PRIMARY KEY (org_id, period_start, stripe_meter, stripe_customer_id);

-- One row in flight per period and meter and customer (a period used under two plans has two sets of rows; the
-- identifiers stay one sequence per period).
DROP INDEX driftlock.stripe_exports_one_pending_idx;
CREATE UNIQUE INDEX stripe_exports_one_pending_idx
    ON driftlock.stripe_exports (org_id, period_start, event_name, stripe_customer_id) WHERE state = 'pending';

-- A row whose attempt may have reached Stripe (no answer, a 5xx or 409, a sender that died mid-call) and which
-- Stripe then refused is not failed at once (failing offers its units again in a new row, billed twice if the
-- earlier attempt landed): it is reconciled against Stripe's total first; `refused_error` keeps the refusal.
ALTER TABLE driftlock.stripe_exports
    ADD COLUMN maybe_landed  boolean NOT NULL DEFAULT false,
    ADD COLUMN refused_error text;

-- A refund frees its unit for the cap decision on every authz replica at once, not when each one's view of the
-- total goes stale: the replica that stores it flushes within 50 ms, and this tells every replica (at commit) to
-- read the organisation's total again. One notification per organisation and period and transaction (PostgreSQL
-- folds identical payloads).
CREATE FUNCTION driftlock.notify_usage_refunded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('driftlock_usage_refunded',
                      json_build_object('org_id', NEW.org_id, 'period_start', NEW.period_start)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_refunds_notify AFTER INSERT ON driftlock.usage_refunds
    FOR EACH ROW EXECUTE FUNCTION driftlock.notify_usage_refunded();
