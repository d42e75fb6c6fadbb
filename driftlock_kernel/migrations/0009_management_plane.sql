-- The customer-facing management plane (issue 23).
--
-- A backend report's request id is unique per organisation, not across all of them: an id organisation A used
-- must not silently drop B's report that happens to carry the same id.
ALTER TABLE driftlock.usage_reports DROP CONSTRAINT usage_reports_pkey;
ALTER TABLE driftlock.usage_reports ADD PRIMARY KEY (org_id, request_id);
