-- Each tenant's verifiable log (ARCHITECTURE.md, "The verifiable log"): every stored event is
-- a leaf, appended once, in the outbox's commit-safe order, by the one worker holding the
-- `_log` row of `destinations` (its lease and cursor). The tree is RFC 6962's; a leaf is
-- SHA-256(0x00 || the event's bytes as GET /v1/events/{id} returns them, log version 1).

-- The leaves: tenant's index `log_index` is permanent; an event is in the log once.
CREATE TABLE log_leaves (
    tenant     text     COLLATE "C" NOT NULL,
    log_index  bigint   NOT NULL CHECK (log_index >= 0),
    event_id   uuid     NOT NULL,
    leaf_hash  bytea    NOT NULL CHECK (octet_length(leaf_hash) = 32),
    CONSTRAINT log_leaves_pkey PRIMARY KEY (tenant, log_index),
    CONSTRAINT log_leaves_event_key UNIQUE (event_id)
);

-- The complete subtrees of height 8 * level (level >= 1): the entries of C2SP tlog-tiles'
-- tiles, one row each, so that a proof reads a few ranges instead of the leaves.
CREATE TABLE log_nodes (
    tenant     text     COLLATE "C" NOT NULL,
    level      smallint NOT NULL CHECK (level >= 1),
    node_index bigint   NOT NULL CHECK (node_index >= 0),
    hash       bytea    NOT NULL CHECK (octet_length(hash) = 32),
    CONSTRAINT log_nodes_pkey PRIMARY KEY (tenant, level, node_index)
);

-- Checkpoints: a C2SP signed note (or, with no key configured, the bare checkpoint text) of
-- the tenant's tree at `tree_size`, signed at `signed_at`.
CREATE TABLE log_checkpoints (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text        COLLATE "C" NOT NULL,
    tree_size  bigint      NOT NULL CHECK (tree_size >= 0),
    root       bytea       NOT NULL CHECK (octet_length(root) = 32),
    signed_at  timestamptz NOT NULL DEFAULT now(),
    signed     boolean     NOT NULL,
    note       text        NOT NULL
);
CREATE INDEX log_checkpoints_newest ON log_checkpoints (tenant, id DESC);

-- Append-only, like audit_events, whoever asks (ENABLE ALWAYS: `session_replication_role`
-- does not silence them). A superuser can still drop them: that is what the signed
-- checkpoints and `auditbridge log audit` are for.
CREATE FUNCTION log_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'The verifiable log is append-only.';
END;
$$;

CREATE TRIGGER log_leaves_no_update_delete BEFORE UPDATE OR DELETE ON log_leaves
    FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
CREATE TRIGGER log_leaves_no_truncate BEFORE TRUNCATE ON log_leaves
    FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
CREATE TRIGGER log_nodes_no_update_delete BEFORE UPDATE OR DELETE ON log_nodes
    FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
CREATE TRIGGER log_nodes_no_truncate BEFORE TRUNCATE ON log_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
CREATE TRIGGER log_checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON log_checkpoints
    FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
CREATE TRIGGER log_checkpoints_no_truncate BEFORE TRUNCATE ON log_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
ALTER TABLE log_leaves ENABLE ALWAYS TRIGGER log_leaves_no_update_delete;
ALTER TABLE log_leaves ENABLE ALWAYS TRIGGER log_leaves_no_truncate;
ALTER TABLE log_nodes ENABLE ALWAYS TRIGGER log_nodes_no_update_delete;
ALTER TABLE log_nodes ENABLE ALWAYS TRIGGER log_nodes_no_truncate;
ALTER TABLE log_checkpoints ENABLE ALWAYS TRIGGER log_checkpoints_no_update_delete;
ALTER TABLE log_checkpoints ENABLE ALWAYS TRIGGER log_checkpoints_no_truncate;
