-- Closing the billing loop: usage to Stripe Billing Meters through an outbox, refunds of calls the backend
-- failed, the billing periods usage was counted in, and what makes stored Stripe state repairable.

-- The Stripe meter (its event_name) a plan's billable units are reported to; NULL: not reported.
ALTER TABLE driftlock.plans
    ADD COLUMN stripe_meter text CHECK (stripe_meter ~ '^[A-Za-z0-9_.:-]{1,100}$');

-- A refund may be flushed by one authz replica before another flushes the count it takes back (Envoy's access
-- log and its ext_authz checks reach replicas independently), so a counter can be below zero for a moment.
-- A constraint here would make that flush fail, and be retried, forever.
ALTER TABLE driftlock.usage_counters DROP CONSTRAINT usage_counters_units_check;
-- The exporter looks at counters that changed recently.
CREATE INDEX usage_counters_updated_at_idx ON driftlock.usage_counters (updated_at);

-- Units taken back because the backend failed the call (5xx, or an upstream timeout, reset or connection
-- failure, as Envoy's access log reports it). The request id makes a refund happen once, whichever replica
-- receives the log entry and however often.
CREATE TABLE driftlock.usage_refunds (
    request_id    text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 200),
    org_id        uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    product       text NOT NULL,
    units         bigint NOT NULL CHECK (units > 0),
    reason        text NOT NULL CHECK (length(reason) BETWEEN 1 AND 32),
    refunded_at   timestamptz NOT NULL DEFAULT now(),
    -- The transaction that stored it: the exporter tells exactly which refunds a reading of the counters did not
    -- see yet (pg_visible_in_snapshot), whatever the clocks and however long a flush took to commit.
    xid           xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX usage_refunds_org_period_idx ON driftlock.usage_refunds (org_id, period_start);

-- Every billing period an organisation has been in, as Stripe reported it: counters are keyed by a period's
-- start only, and the exporter needs its end long after the organisation moved on to the next one. Kept by a
-- trigger, so that any change of the period columns (the webhook service, or plain SQL) is recorded.
CREATE TABLE driftlock.billing_periods (
    org_id        uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL CHECK (period_end > period_start),
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period_start)
);

CREATE FUNCTION driftlock.record_billing_period() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.period_start IS NULL THEN
        RETURN NULL;
    END IF;
    -- A period that began before the previous one was due to end (a billing cycle anchor reset) cut it short.
    IF TG_OP = 'UPDATE' AND OLD.period_start IS NOT NULL AND OLD.period_start < NEW.period_start THEN
        UPDATE driftlock.billing_periods SET period_end = NEW.period_start
        WHERE org_id = NEW.id AND period_start = OLD.period_start AND period_end > NEW.period_start;
    END IF;
    INSERT INTO driftlock.billing_periods (org_id, period_start, period_end)
    VALUES (NEW.id, NEW.period_start, NEW.period_end)
    ON CONFLICT (org_id, period_start) DO UPDATE SET period_end = EXCLUDED.period_end, recorded_at = now();
    RETURN NULL;
END
$$;
CREATE TRIGGER organizations_billing_period AFTER INSERT OR UPDATE OF period_start, period_end
    ON driftlock.organizations
    FOR EACH ROW EXECUTE FUNCTION driftlock.record_billing_period();
INSERT INTO driftlock.billing_periods (org_id, period_start, period_end)
    SELECT id, period_start, period_end FROM driftlock.organizations WHERE period_start IS NOT NULL;

-- The outbox of usage reported to Stripe. A row is decided in a transaction (what is stored minus what rows
-- already cover), then sent as one meter event with its `identifier`, as often as it takes; Stripe deduplicates
-- on the identifier, so a retry after a timeout, a lost reply or a crash never counts twice.
--   pending  to be sent (at most one per organisation and period)
--   sent     Stripe accepted it (or answered that it has it already)
--   failed   Stripe refused it for a reason a retry cannot fix; `error` is Stripe's message
--   skipped  not sent, and never will be by itself: the period's invoice was already final at Stripe when the
--            units were counted, or whether an old attempt reached Stripe could not be told; `error` says which
CREATE TABLE driftlock.stripe_exports (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id              uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start        timestamptz NOT NULL,
    period_end          timestamptz NOT NULL CHECK (period_end > period_start),
    seq                 integer NOT NULL CHECK (seq > 0),
    identifier          text NOT NULL UNIQUE CHECK (length(identifier) BETWEEN 1 AND 100),
    event_name          text NOT NULL,
    stripe_customer_id  text NOT NULL,
    units               bigint NOT NULL CHECK (units > 0),
    event_timestamp     timestamptz NOT NULL,
    state               text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed', 'skipped')),
    attempts            integer NOT NULL DEFAULT 0,
    -- When the identifier may first have reached Stripe (set when a sender claims the row, before it sends):
    -- Stripe deduplicates an identifier for 24 hours from then.
    first_attempt_at    timestamptz,
    last_attempt_at     timestamptz,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    claim_token         uuid,
    claimed_by          text,
    claimed_until       timestamptz,
    stripe_request_id   text,
    error               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    UNIQUE (org_id, period_start, seq)
);
CREATE UNIQUE INDEX stripe_exports_one_pending_idx ON driftlock.stripe_exports (org_id, period_start)
    WHERE state = 'pending';
CREATE INDEX stripe_exports_due_idx ON driftlock.stripe_exports (next_attempt_at) WHERE state = 'pending';
CREATE INDEX stripe_exports_created_at_idx ON driftlock.stripe_exports (created_at);
-- Not an append-only log to prune: what a period's rows cover is what the next decision subtracts, so a row must
-- outlive its period's reporting (the exporter looks 40 days back).

-- What the exporter may report of an open period. A counted unit waits for the refund of its call before it is
-- reported: every pass takes a candidate (the period's stored total, when, and the snapshot it was read in), and
-- a candidate that has waited long enough becomes the settled mark; what may be reported is the settled total
-- less the refunds its snapshot did not see.
CREATE TABLE driftlock.stripe_export_marks (
    org_id              uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start        timestamptz NOT NULL,
    candidate_at        timestamptz NOT NULL,
    candidate_units     bigint NOT NULL,
    candidate_snapshot  pg_snapshot NOT NULL,
    settled_at          timestamptz,
    settled_units       bigint,
    settled_snapshot    pg_snapshot,
    PRIMARY KEY (org_id, period_start)
);

-- Stripe may send strings that PostgreSQL's jsonb cannot hold (`\u0000`); such a payload is kept as the exact
-- text received instead. `attempts` counts applications of the event (a delivery of an event stored as
-- `failed` is applied again, and so is a replay).
ALTER TABLE driftlock.stripe_events
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN payload_text text,
    ADD COLUMN attempts integer NOT NULL DEFAULT 1,
    ADD COLUMN replayed_at timestamptz,
    ADD CONSTRAINT stripe_events_payload_present CHECK ((payload IS NULL) <> (payload_text IS NULL));
