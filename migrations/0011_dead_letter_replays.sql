-- Dead-letter replay (`auditbridge dead-letters replay`, issue 13): a dead letter of ingest is
-- published to JetStream again, exactly or corrected, and the worker's verdict on it is kept
-- here. One row per replay: when, by whom, how (exact or corrected), where JetStream stored
-- it, and what the worker did with it (stored, duplicate, or a new dead letter).
--
-- The link between a replayed message and its dead letter is a random nonce that only this
-- table and the replayed message know (header `Auditbridge-Replay`), bound to the SHA-256 of
-- the payload published. The worker records a verdict only for a message whose nonce is here
-- with the same payload hash and no verdict yet, in the transaction that stores the event or
-- the new dead letter: a producer cannot set the link, nor change a verdict, by sending a
-- header of its own.
CREATE TABLE dead_letter_replays (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dead_letter_id     bigint      NOT NULL REFERENCES dead_letters (id) ON DELETE CASCADE,
    nonce              uuid        NOT NULL UNIQUE,
    -- The payload published: the dead letter's own (exact) or one given with --payload.
    corrected          boolean     NOT NULL,
    payload_sha256     bytea       NOT NULL CHECK (octet_length(payload_sha256) = 32),
    requested_by       text        NOT NULL,
    requested_at       timestamptz NOT NULL DEFAULT now(),
    -- Filled once JetStream acknowledged the publication.
    stream             text,
    stream_seq         bigint,
    published_at       timestamptz,
    -- The worker's verdict.
    result             text CHECK (result IN ('stored', 'duplicate', 'dead_letter')),
    event_id           uuid,
    new_dead_letter_id bigint      REFERENCES dead_letters (id) ON DELETE SET NULL,
    decided_at         timestamptz,
    CHECK ((result IS NULL) = (decided_at IS NULL))
);
CREATE INDEX dead_letter_replays_dead_letter ON dead_letter_replays (dead_letter_id);
CREATE INDEX dead_letter_replays_new_dead_letter ON dead_letter_replays (new_dead_letter_id)
    WHERE new_dead_letter_id IS NOT NULL;

-- A dead letter that came from a replay names the dead letter it was replayed from, as the
-- worker found it through the nonce (never from anything in the message itself).
ALTER TABLE dead_letters
    ADD COLUMN replay_of bigint REFERENCES dead_letters (id) ON DELETE SET NULL;
CREATE INDEX dead_letters_replay_of ON dead_letters (replay_of) WHERE replay_of IS NOT NULL;
