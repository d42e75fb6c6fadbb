-- The customer-facing management plane (issue 23).
--
-- A backend report's request id is unique per organisation, not across all of them: an id organisation A used
-- must not silently drop B's report that happens to carry the same id.
ALTER TABLE driftlock.usage_reports DROP CONSTRAINT usage_reports_pkey;
ALTER TABLE driftlock.usage_reports ADD PRIMARY KEY (org_id, request_id);

-- A new key's hash prefix (its first 8 bytes, hex) travels with its notification: every authz replica keeps the
-- prefixes of all keys in memory (authz_service/check/key_index.py) to refuse invented keys without a query, and
-- learns a new key from this message alone. The prefix of a SHA-256 of a random secret reveals nothing usable.
CREATE OR REPLACE FUNCTION driftlock.notify_invalidate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
    message jsonb := jsonb_build_object('table', TG_TABLE_NAME, 'id', changed ->> TG_ARGV[0]);
BEGIN
    IF TG_TABLE_NAME = 'api_keys' AND TG_OP = 'INSERT' THEN
        message := message || jsonb_build_object('hash', encode(substring(NEW.key_hash FROM 1 FOR 8), 'hex'));
    END IF;
    PERFORM pg_notify('driftlock_invalidate', message::text);
    RETURN NULL;
END
$$;

-- Denials of a known key (revoked, over quota, rate limited, a test key past its allowance) are counted like
-- those naming no key: one row per minute, key and code, beside the first such denial kept whole in audit_log by
-- each replica. A refused key from many addresses then writes a few rows a minute, not one per request.
ALTER TABLE driftlock.audit_denials ADD COLUMN org_id uuid;
ALTER TABLE driftlock.audit_denials ADD COLUMN key_id uuid;
ALTER TABLE driftlock.audit_denials DROP CONSTRAINT audit_denials_minute_source_code_key;
ALTER TABLE driftlock.audit_denials
    ADD CONSTRAINT audit_denials_group UNIQUE NULLS NOT DISTINCT (minute, source, code, key_id);
CREATE INDEX audit_denials_key_idx ON driftlock.audit_denials (org_id, minute) WHERE org_id IS NOT NULL;
