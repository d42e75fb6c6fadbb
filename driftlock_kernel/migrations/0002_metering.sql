-- Metering: usage per organisation, billing period and product; the flushes that wrote it (exactly once);
-- units the backend reported (idempotent by request id); usage alerts (exactly once per threshold); the audit log.

CREATE TABLE driftlock.usage_counters (
    org_id        uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    product       text NOT NULL CHECK (product ~ '^[a-z][a-z0-9_]{0,31}$'),
    units         bigint NOT NULL CHECK (units >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period_start, product)
);

-- One row per applied flush. A flush whose commit was not acknowledged is retried with the same id; finding
-- the id here means it was applied already.
CREATE TABLE driftlock.meter_flushes (
    flush_id    uuid PRIMARY KEY,
    replica     text NOT NULL,
    units       bigint NOT NULL,
    flushed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX meter_flushes_flushed_at_idx ON driftlock.meter_flushes (flushed_at);

-- Extra units the backend reported for requests it served; the request id makes a report idempotent.
CREATE TABLE driftlock.usage_reports (
    request_id    text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 200),
    org_id        uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start  timestamptz NOT NULL,
    product       text NOT NULL,
    units         bigint NOT NULL CHECK (units > 0),
    reported_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_reports_reported_at_idx ON driftlock.usage_reports (reported_at);

CREATE TABLE driftlock.usage_alerts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    threshold       integer NOT NULL CHECK (threshold IN (70, 90, 100)),
    used_units      bigint NOT NULL,
    included_units  bigint NOT NULL,
    plan_name       text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    webhook_delivered_at  timestamptz,
    webhook_attempts      integer NOT NULL DEFAULT 0,
    -- Exactly one alert per organisation, period and threshold, however many replicas race to raise it.
    UNIQUE (org_id, period_start, threshold)
);
CREATE INDEX usage_alerts_undelivered_idx ON driftlock.usage_alerts (created_at) WHERE webhook_delivered_at IS NULL;

-- Published at commit, whoever inserts the alert.
CREATE FUNCTION driftlock.notify_usage_alert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('driftlock_usage_alert', json_build_object(
        'id', NEW.id, 'org_id', NEW.org_id, 'threshold', NEW.threshold,
        'period_start', NEW.period_start, 'used_units', NEW.used_units, 'included_units', NEW.included_units)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_alerts_notify AFTER INSERT ON driftlock.usage_alerts
    FOR EACH ROW EXECUTE FUNCTION driftlock.notify_usage_alert();

CREATE TABLE driftlock.audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL,
    request_id  text,
    org_id      uuid,
    key_id      uuid,
    method      text,
    path        text,
    decision    text NOT NULL CHECK (decision IN ('allow', 'deny')),
    code        text NOT NULL
);
CREATE INDEX audit_log_at_idx ON driftlock.audit_log (at);
CREATE INDEX audit_log_org_at_idx ON driftlock.audit_log (org_id, at);

-- authz keeps every plan in memory: a new plan must reach it too, not only changed ones.
DROP TRIGGER plans_invalidate ON driftlock.plans;
CREATE TRIGGER plans_invalidate AFTER INSERT OR UPDATE OR DELETE ON driftlock.plans
    FOR EACH ROW EXECUTE FUNCTION driftlock.notify_invalidate('name');
