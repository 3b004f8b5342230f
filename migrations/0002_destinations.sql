-- Forwarding progress: one row per destination. The events table is the outbox; each
-- destination keeps a cursor into its commit-safe (tx_id, seq) order (see ARCHITECTURE.md,
-- "The outbox"). Everything at or before the cursor has been confirmed by the destination (or
-- skipped by its max_backlog_age, and counted).
CREATE TABLE destinations (
    name              text        PRIMARY KEY,
    type              text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    cursor_tx         xid8        NOT NULL,
    cursor_seq        bigint      NOT NULL,
    -- The worker relaying this destination, and until when (renewed while it works).
    lease_holder      text,
    lease_expires_at  timestamptz,
    delivered_total   bigint      NOT NULL DEFAULT 0,
    skipped_total     bigint      NOT NULL DEFAULT 0,
    last_delivered_at timestamptz,
    last_error        text,
    last_error_at     timestamptz,
    -- The destination refused the last attempt itself (e.g. HTTP 4xx): someone must look.
    failing           boolean     NOT NULL DEFAULT false
);
