-- Abuse resistance (issue 9).
--
-- Denials that name no known key (no key, a malformed or unknown one, authz unable to tell) cost a client nothing
-- to cause: counted per minute, source address and code instead of one audit_log row each, so that a flood from
-- one address writes a row a minute per code. Every replica adds its counts to the same row. Denials of a known
-- key stay in audit_log, one row each.
CREATE TABLE driftlock.audit_denials (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    minute      timestamptz NOT NULL,
    source      text        NOT NULL,  -- the client's address as Envoy saw it; '*' for many, past a replica's bound
    code        text        NOT NULL,
    count       bigint      NOT NULL CHECK (count > 0),
    first_at    timestamptz NOT NULL,
    last_at     timestamptz NOT NULL,
    -- The first denial of the group a replica wrote, as an example.
    request_id  text,
    method      text,
    path        text,
    UNIQUE (minute, source, code)
);
CREATE INDEX audit_denials_source_idx ON driftlock.audit_denials (source, minute);

-- Where each audited request came from.
ALTER TABLE driftlock.audit_log ADD COLUMN source text;
