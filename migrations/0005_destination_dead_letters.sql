-- Per-destination dead letters: events a destination can never take as they are (an AMQP
-- routing key over 255 bytes, a message the broker returns as unroutable, an event the
-- receiver refuses alone while it takes the events around it), kept when the destination's
-- `on_undeliverable` is `dead_letter` (the default) before its cursor moves past them. The
-- event itself stays in audit_events; this row says which destination did not get it, where it
-- was in the outbox order, and why. One row per event per destination, kept once.
CREATE TABLE destination_dead_letters (
    destination text        NOT NULL,
    event_id    uuid        NOT NULL,
    -- The event's outbox position, (tx_id, seq) as in audit_events.
    tx_id       xid8        NOT NULL,
    seq         bigint      NOT NULL,
    -- A short label (routing_key, returned, status_4xx, ...) and the destination's answer.
    kind        text        NOT NULL,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, event_id)
);
