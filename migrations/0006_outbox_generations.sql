-- Outbox generations (ARCHITECTURE.md, "The outbox", "Moving to another cluster").
--
-- `tx_id` values are transaction ids of the cluster that wrote the row. A trail copied to
-- another cluster (pg_dump / pg_restore, logical replication) keeps them, but the new
-- cluster's ids may be far lower: nothing it writes would ever sort after a cursor, and the
-- copied rows would stay above its horizon. `auditbridge outbox rebase` then starts a new
-- generation: every row whose `seq` is at or above its `first_seq` belongs to it, and the
-- outbox order is (generation, tx_id, seq). `seq` keeps rising across a dump and restore
-- (pg_dump restores the identity's sequence), so a row's generation follows from its `seq`
-- and `audit_events` itself is unchanged.
CREATE TABLE outbox_generations (
    generation  integer     PRIMARY KEY CHECK (generation >= 0),
    first_seq   bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The highest tx_id stored when the generation began (NULL for the first): rows above it
    -- are this generation's, which keeps the check for a moved trail cheap.
    above_tx    xid8,
    -- What `rebase` found: the cluster's next transaction id and the highest stored one.
    reason      text        NOT NULL,
    CONSTRAINT outbox_generations_first_seq_key UNIQUE (first_seq)
);
INSERT INTO outbox_generations (generation, first_seq, reason)
    VALUES (0, 0, 'the first generation');

-- A cursor is (cursor_gen, cursor_tx, cursor_seq).
ALTER TABLE destinations ADD COLUMN cursor_gen integer NOT NULL DEFAULT 0;
