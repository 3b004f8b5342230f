-- The query API's "who touched this resource" (`GET /v1/events?target=...`): by tenant and
-- target, in time order. Events without a target are not indexed (most queries by target name
-- one), which keeps the cost to ingest lower.
CREATE INDEX audit_events_tenant_target ON audit_events (tenant, target_id, occurred_at)
    WHERE target_id IS NOT NULL;
