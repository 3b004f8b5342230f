-- The audit trail. One row per event, deduplicated by id, immutable once written.
--
-- `seq` and `tx_id` make the table its own outbox (see ARCHITECTURE.md, "The outbox"):
-- a relay reads rows in (tx_id, seq) order, and only rows whose transaction is older than
-- the oldest transaction still running (pg_snapshot_xmin), so a row that commits late can
-- never fall behind a cursor that has already moved past it.
CREATE TABLE audit_events (
    id          uuid        NOT NULL,
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    tx_id       xid8        NOT NULL DEFAULT pg_current_xact_id(),
    tenant      text        COLLATE "C" NOT NULL,
    action      text        COLLATE "C" NOT NULL,
    outcome     text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    actor_id    text        NOT NULL,
    target_id   text,
    source      text        NOT NULL,
    event       jsonb       NOT NULL,
    CONSTRAINT audit_events_pkey PRIMARY KEY (id),
    CONSTRAINT audit_events_outcome_check
        CHECK (outcome IN ('success', 'failure', 'denied', 'unknown'))
);

-- Per-tenant time-range queries (the common case), by actor, and by action prefix
-- (`action` is COLLATE "C", so `action LIKE 'document.%'` can use the btree).
CREATE INDEX audit_events_tenant_time ON audit_events (tenant, occurred_at, id);
CREATE INDEX audit_events_tenant_actor ON audit_events (tenant, actor_id, occurred_at);
CREATE INDEX audit_events_tenant_action ON audit_events (tenant, action, occurred_at);
-- The relay's commit-safe order.
CREATE INDEX audit_events_outbox_order ON audit_events (tx_id, seq);

-- Guarantee 6: stored events are immutable, whoever asks. The triggers are ENABLE ALWAYS so
-- that `SET session_replication_role = replica` (which silences ordinary triggers) does not
-- bypass them either.
CREATE FUNCTION audit_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit events are immutable; record a new event instead.';
END;
$$;

CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_update_delete;
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate;

-- Guarantee 5: bad input is kept, with a reason a person can act on, and can be replayed.
CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL,
    stream_seq  bigint      NOT NULL,
    subject     text        NOT NULL,
    payload     bytea       NOT NULL,
    kind        text        NOT NULL,
    reason      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz,
    -- A poison message redelivered after a crash (stored, then the worker died before `Term`)
    -- is kept once.
    CONSTRAINT dead_letters_stream_seq_key UNIQUE (stream, stream_seq)
);
CREATE INDEX dead_letters_kind ON dead_letters (kind, received_at);
