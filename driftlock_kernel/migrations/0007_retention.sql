-- Retention: append-only tables (meter_flushes, usage_reports, audit_log, stripe_events) are pruned past their
-- retention by one replica at a time. A replica claims a run by moving `started_at` forward with a conditional
-- UPDATE (one statement, so it works through a transaction pooler); the others find the run claimed and skip.
CREATE TABLE driftlock.maintenance_runs (
    task         text PRIMARY KEY CHECK (length(task) BETWEEN 1 AND 64),
    started_at   timestamptz NOT NULL DEFAULT '-infinity',
    finished_at  timestamptz,
    replica      text,
    -- What the last finished run did, e.g. rows deleted per table.
    detail       jsonb
);
INSERT INTO driftlock.maintenance_runs (task) VALUES ('prune');
