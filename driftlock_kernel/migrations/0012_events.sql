-- Events to the product (issue 19): an outbox of events, the endpoints that receive them, and one delivery row
-- per event and endpoint. Delivered in the Standard Webhooks format by authz (authz_service/events/).
--
-- An event is written in the transaction that makes the change it tells of. Changes any code path (or plain SQL)
-- can make are turned into events by triggers below, so the change and its event cannot part; events of the
-- clock (a key about to expire, a grace period that ended) and of Stripe are written by the code that sees them.
-- `dedupe_key` makes each occurrence one event: a replayed Stripe event, a second replica or a second scan
-- writes the same key, and ON CONFLICT DO NOTHING keeps the first.

CREATE TABLE driftlock.events (
    id             text PRIMARY KEY DEFAULT 'evt_' || replace(gen_random_uuid()::text, '-', ''),
    type           text NOT NULL CHECK (type ~ '^[a-z_]+\.[a-z_]+$'),
    -- No foreign key: an organisation's events outlive it (they are how the product learns what happened).
    org_id         uuid,
    data           jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    dedupe_key     text UNIQUE,
    -- Only the operator's endpoint receives it (e.g. "a customer's endpoint was disabled").
    operator_only  boolean NOT NULL DEFAULT false,
    -- Set once a delivery row exists for every endpoint subscribed when it was fanned out.
    fanned_out_at  timestamptz
);
CREATE INDEX events_to_fan_out_idx ON driftlock.events (occurred_at) WHERE fanned_out_at IS NULL;
CREATE INDEX events_org_idx ON driftlock.events (org_id, occurred_at);

-- An organisation's endpoints. The secret signs what is sent, so it is stored as given (like a Stripe webhook
-- endpoint's); it is shown once, at creation.
CREATE TABLE driftlock.event_endpoints (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id          uuid NOT NULL REFERENCES driftlock.organizations (id) ON DELETE CASCADE,
    url             text NOT NULL CHECK (length(url) <= 2000),
    secret          text NOT NULL,
    -- Empty: every type.
    event_types     text[] NOT NULL DEFAULT '{}',
    -- Since when every attempt failed (NULL once one succeeds); disabled when that lasts too long.
    failing_since   timestamptz,
    disabled_at     timestamptz,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_endpoints_org_idx ON driftlock.event_endpoints (org_id);

-- One row per event and endpoint; endpoint_id NULL is the operator's (DRIFTLOCK_EVENTS_WEBHOOK_URL).
CREATE TABLE driftlock.event_deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         text NOT NULL REFERENCES driftlock.events (id) ON DELETE CASCADE,
    endpoint_id      uuid REFERENCES driftlock.event_endpoints (id) ON DELETE CASCADE,
    -- pending: to send (again); delivered: a 2xx answered; failed: given up (too old).
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (event_id, endpoint_id)
);
CREATE INDEX event_deliveries_due_idx ON driftlock.event_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX event_deliveries_endpoint_idx ON driftlock.event_deliveries (endpoint_id, created_at);

-- The minutely scan for keys about to expire (authz_service/events/delivery.py) reads only keys that can.
CREATE INDEX api_keys_expiring_idx ON driftlock.api_keys (expires_at)
    WHERE expires_at IS NOT NULL AND revoked_at IS NULL AND rolled_to IS NULL;

-- Write one event (once per dedupe key); NOTIFY wakes the delivering replicas at commit.
CREATE FUNCTION driftlock.emit_event(event_type text, event_org uuid, event_data jsonb, key text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    new_id text;
BEGIN
    INSERT INTO driftlock.events (type, org_id, data, dedupe_key)
    VALUES (event_type, event_org, event_data || jsonb_build_object('org_id', event_org), key)
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('driftlock_events', json_build_object('id', new_id)::text);
    END IF;
    RETURN new_id;
END
$$;

-- usage.threshold_reached: usage_alerts already holds exactly one row per organisation, period and threshold.
CREATE FUNCTION driftlock.usage_alert_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM driftlock.emit_event('usage.threshold_reached', NEW.org_id, jsonb_build_object(
        'alert_id', NEW.id, 'threshold', NEW.threshold, 'used', NEW.used_units, 'included', NEW.included_units,
        'plan', NEW.plan_name, 'period_start', NEW.period_start, 'period_end', NEW.period_end),
        'usage.threshold_reached:' || NEW.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_alerts_event AFTER INSERT ON driftlock.usage_alerts
    FOR EACH ROW EXECUTE FUNCTION driftlock.usage_alert_event();

-- usage.spend_cap_reached for a plan's hard cap (block: the included units; soft: hard_cap_percent of them),
-- once per organisation and period: when the pooled total first reaches it.
CREATE FUNCTION driftlock.usage_cap_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    cap bigint;
BEGIN
    SELECT CASE WHEN p.overage = 'block' THEN p.included_units
                WHEN p.hard_cap_percent IS NOT NULL THEN ceil(p.included_units * p.hard_cap_percent / 100.0)::bigint
           END
    INTO cap
    FROM driftlock.organizations o JOIN driftlock.plans p ON p.name = o.plan_name
    WHERE o.id = NEW.org_id;
    IF cap IS NOT NULL AND cap > 0 AND NEW.units >= cap
       AND (TG_OP = 'INSERT' OR OLD.units < cap) THEN
        PERFORM driftlock.emit_event('usage.spend_cap_reached', NEW.org_id, jsonb_build_object(
            'used', NEW.units, 'cap', cap, 'cap_kind', 'hard_cap', 'period_start', NEW.period_start),
            'usage.spend_cap_reached:hard_cap:' || NEW.org_id || ':' || extract(epoch FROM NEW.period_start)::bigint);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_totals_cap_event AFTER INSERT OR UPDATE OF units ON driftlock.usage_totals
    FOR EACH ROW EXECUTE FUNCTION driftlock.usage_cap_event();

-- key.revoked and key.rolled: a key is revoked once and rolled once (api_keys.py refuses a second time).
CREATE FUNCTION driftlock.api_key_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        PERFORM driftlock.emit_event('key.revoked', NEW.org_id, jsonb_build_object(
            'key_id', NEW.id, 'revoked_at', NEW.revoked_at), 'key.revoked:' || NEW.id);
    END IF;
    IF OLD.rolled_to IS NULL AND NEW.rolled_to IS NOT NULL THEN
        PERFORM driftlock.emit_event('key.rolled', NEW.org_id, jsonb_build_object(
            'key_id', NEW.id, 'new_key_id', NEW.rolled_to, 'old_expires_at', NEW.expires_at),
            'key.rolled:' || NEW.id);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_event AFTER UPDATE OF revoked_at, rolled_to ON driftlock.api_keys
    FOR EACH ROW EXECUTE FUNCTION driftlock.api_key_event();

-- org.suspended / org.resumed, billing.plan_changed, billing.payment_recovered: transitions of the row, so one
-- change is one event (a replayed Stripe event or a second suspend changes nothing, and so says nothing).
CREATE FUNCTION driftlock.organization_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.suspended_at IS NULL AND NEW.suspended_at IS NOT NULL THEN
        PERFORM driftlock.emit_event('org.suspended', NEW.id, jsonb_build_object(
            'suspended_at', NEW.suspended_at), NULL);
    ELSIF OLD.suspended_at IS NOT NULL AND NEW.suspended_at IS NULL THEN
        PERFORM driftlock.emit_event('org.resumed', NEW.id, jsonb_build_object(
            'suspended_since', OLD.suspended_at), NULL);
    END IF;
    IF OLD.plan_name IS DISTINCT FROM NEW.plan_name THEN
        PERFORM driftlock.emit_event('billing.plan_changed', NEW.id, jsonb_build_object(
            'plan', NEW.plan_name, 'previous_plan', OLD.plan_name), NULL);
    END IF;
    IF OLD.billing_status IN ('past_due', 'unpaid') AND NEW.billing_status IN ('active', 'trialing') THEN
        PERFORM driftlock.emit_event('billing.payment_recovered', NEW.id, jsonb_build_object(
            'billing_status', NEW.billing_status, 'past_due_since', OLD.past_due_since),
            NULL);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER organizations_event AFTER UPDATE OF suspended_at, plan_name, billing_status
    ON driftlock.organizations
    FOR EACH ROW EXECUTE FUNCTION driftlock.organization_event();
