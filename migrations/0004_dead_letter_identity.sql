-- Finding 9: a dead letter is keyed by the message, not by its place in one incarnation of the
-- stream. `(stream, stream_seq)` repeats when a stream is deleted and created again (its
-- sequence starts over), and the unique key then dropped a new poison message as if it were
-- a redelivery of an old one. JetStream's own timestamp of the message (when the stream stored
-- it) tells the two apart: the old message was stored before the old stream was deleted, the
-- new one after the new stream was created. A redelivery carries the same timestamp, so a
-- poison message redelivered after a crash is still kept once.
--
-- Rows written before this migration have no timestamp (NULL); NULLs are distinct in a unique
-- key, so they never collide with new rows.
ALTER TABLE dead_letters ADD COLUMN stream_stored_at timestamptz;
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_stream_seq_key;
ALTER TABLE dead_letters
    ADD CONSTRAINT dead_letters_message_key UNIQUE (stream, stream_seq, stream_stored_at);
