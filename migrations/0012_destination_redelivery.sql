-- Re-delivery of a destination's dead letters (`auditbridge destinations redeliver NAME
-- [ID…]`, issue 13): once the destination can take them (a routing key shortened by a new
-- template, a receiver fixed), the relay holding the destination's lease offers each requested
-- event again, alone, and records what happened. A row stays as the record: redelivered, or
-- refused again with the new answer (`last_reason`; `kind` and `reason` stay the first
-- refusal's) and one more attempt.
ALTER TABLE destination_dead_letters
    ADD COLUMN redeliver_requested_at timestamptz,
    ADD COLUMN redeliver_requested_by text,
    ADD COLUMN redelivered_at         timestamptz,
    ADD COLUMN attempts               integer NOT NULL DEFAULT 0,
    ADD COLUMN last_attempt_at        timestamptz,
    ADD COLUMN last_reason            text;
-- What the relays look for every few seconds: only the rows waiting.
CREATE INDEX destination_dead_letters_requested ON destination_dead_letters (destination)
    WHERE redeliver_requested_at IS NOT NULL;
