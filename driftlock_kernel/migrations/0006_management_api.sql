-- The management API: free-form metadata on keys, which key replaced a rolled one, when each key was last
-- used, and who did each management action (in the audit log).

ALTER TABLE driftlock.api_keys
    ADD COLUMN metadata   jsonb NOT NULL DEFAULT '{}'::jsonb
                          CHECK (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 8192),
    -- Set when the key is rolled: the key that replaced it (the old one expires at the end of the overlap).
    ADD COLUMN rolled_to  uuid REFERENCES driftlock.api_keys (id) ON DELETE SET NULL,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
-- Listing an organisation's keys a page at a time, in creation order.
CREATE INDEX api_keys_org_created_idx ON driftlock.api_keys (org_id, created_at, id);
DROP INDEX driftlock.api_keys_org_id_idx;
CREATE INDEX organizations_created_idx ON driftlock.organizations (created_at, id);

-- When each key last authenticated a request, written by authz in batches (at most one statement every few
-- seconds per replica). A table of its own, so that these writes neither rewrite api_keys rows nor fire its
-- invalidation trigger, which would empty every replica's key cache as often as keys are used.
CREATE TABLE driftlock.api_key_last_used (
    key_id        uuid PRIMARY KEY REFERENCES driftlock.api_keys (id) ON DELETE CASCADE,
    last_used_at  timestamptz NOT NULL
);

-- Management actions (through the API or the CLI) are audited with the caller: the admin token's `iss` and
-- `sub`, the action (`keys.roll`, ...) and what it changed. Request-path entries leave these empty.
ALTER TABLE driftlock.audit_log
    ADD COLUMN actor_issuer  text,
    ADD COLUMN actor_subject text,
    ADD COLUMN action        text,
    ADD COLUMN detail        jsonb;
CREATE INDEX audit_log_actions_idx ON driftlock.audit_log (at) WHERE action IS NOT NULL;
