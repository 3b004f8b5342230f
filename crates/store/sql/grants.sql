-- Every privilege of Auditbridge's database roles, in one place (README, "Database roles";
-- ARCHITECTURE.md, invariant "Least privilege").
--
-- `auditbridge migrate` applies this file after the migrations, in one transaction, on every
-- run: it first takes every privilege of the writer and the reader away, then grants exactly
-- what is listed here. So this file is the whole truth, an upgrade that changes it needs no
-- migration, and a privilege granted by hand is gone at the next `migrate`. A table added by
-- a migration gets its grants HERE (tests/tests/e2e/roles.rs fails for a table the reader cannot
-- read, and for a worker or `serve` that needs a privilege that is missing).
--
-- The roles are cluster-global and created by `migrate` unless `--no-roles` (crates/store/src/
-- roles.rs). This file can also be applied by hand with psql where roles are managed
-- elsewhere, once the four roles exist.
--
--   auditbridge_owner   owns every object of the schema; used only by `migrate`. It can
--                       still alter the trail (an owner always can); the signed log detects it.
--   auditbridge_writer  `auditbridge worker`: inserts events and dead letters, relays.
--   auditbridge_reader  `auditbridge serve` and `auditbridge status`: reads, nothing else.
--   auditbridge_poller  `auditbridge poll`: its sources' cursors, leases and rejected items,
--                       nothing of the trail (events reach it through JetStream and a worker).

-- Two `migrate`s of the same database at once would otherwise collide on the catalog rows
-- they both rewrite ("tuple concurrently updated").
SELECT pg_advisory_xact_lock(7243586041907425121);

-- Ownership: every table, view, sequence and function of the schema belongs to the owner
-- role, including what a migration run by a superuser just created.
DO $$
DECLARE
    obj record;
BEGIN
    FOR obj IN
        SELECT c.oid::regclass AS name, c.relkind
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND c.relowner <> 'auditbridge_owner'::regrole
          -- Identity and owned sequences follow their table. (Partitions depend on their
          -- parent too, but each has its own owner.)
          AND NOT (c.relkind = 'S' AND EXISTS (
                       SELECT 1 FROM pg_depend d
                       WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                         AND d.deptype IN ('a', 'i')))
    LOOP
        IF obj.relkind = 'S' THEN
            EXECUTE format('ALTER SEQUENCE %s OWNER TO auditbridge_owner', obj.name);
        ELSE
            EXECUTE format('ALTER TABLE %s OWNER TO auditbridge_owner', obj.name);
        END IF;
    END LOOP;
    FOR obj IN
        SELECT p.oid::regprocedure AS name
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND p.proowner <> 'auditbridge_owner'::regrole
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO auditbridge_owner', obj.name);
    END LOOP;
    -- So that `migrate` can also run as the owner itself (AUDITBRIDGE_MIGRATE_DATABASE_URL).
    IF NOT has_schema_privilege('auditbridge_owner', 'public', 'CREATE') THEN
        GRANT CREATE ON SCHEMA public TO auditbridge_owner;
    END IF;
END
$$;

-- Start from nothing. Nobody but the owner creates objects in the schema (PostgreSQL 15 no
-- longer lets PUBLIC, but a cluster upgraded from an older version still does): a writer
-- that could would be able to add functions or tables beside the trail's.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
-- Nor temporary tables: a temporary table shadows a table of the same name for its session,
-- and the guarded retention path must only ever see the real ones (its functions also put
-- pg_temp last on their search_path: migration 0010).
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END
$$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM auditbridge_writer, auditbridge_reader,
    auditbridge_poller;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM auditbridge_writer, auditbridge_reader,
    auditbridge_poller;
-- Functions: PostgreSQL lets PUBLIC execute every new function. The guarded retention path
-- (0008, 0009) is SECURITY DEFINER, so only the roles named below may call it.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC, auditbridge_writer, auditbridge_reader,
    auditbridge_poller;
GRANT USAGE ON SCHEMA public TO auditbridge_writer, auditbridge_reader, auditbridge_poller;

-- The writer (`auditbridge worker`).
--
-- audit_events: INSERT only on the columns a batch carries. Not `seq`, `tx_id` or
-- `received_at`, which the database fills: a writer that could set them could place a row
-- behind every destination's cursor and every live tail. No UPDATE, DELETE, TRUNCATE,
-- TRIGGER or REFERENCES, and not the owner, so it can neither change stored events nor
-- disable, drop or work around the triggers that refuse it. SELECT: the relay reads the
-- outbox, the dedup check reads stored rows. `retention_class` places a row in a partition
-- (0008); it cannot make a row expire sooner (expiry judges by the tenant's policy).
-- `seq` comes from `audit_events_seq`, whose default needs USAGE (nextval); not UPDATE, so
-- no setval. Partitions get no grants: rows go in and come out through `audit_events`.
GRANT SELECT ON audit_events TO auditbridge_writer;
GRANT INSERT (id, tenant, action, outcome, occurred_at, actor_id, target_id, source, event,
              retention_class, redaction)
    ON audit_events TO auditbridge_writer;
-- The comparison of a re-sent event without the paths either side redacted (0013).
GRANT EXECUTE ON FUNCTION auditbridge_without(jsonb, text[]) TO auditbridge_writer;
GRANT USAGE ON SEQUENCE audit_events_seq TO auditbridge_writer;
-- The ids of every event (0008), written only by the insert's SECURITY DEFINER trigger.
GRANT SELECT ON audit_event_ids TO auditbridge_writer;
-- Retention (0008): the policies `migrate` wrote, the partitions; the workers create the
-- partitions ahead of need through the guarded function.
GRANT SELECT ON retention_settings, retention_policies, audit_partitions TO auditbridge_writer;
GRANT EXECUTE ON FUNCTION auditbridge_ensure_partitions(), auditbridge_keep_s(text)
    TO auditbridge_writer;
-- Legal holds (0009): `auditbridge hold add` runs as the writer and may add holds, with who
-- and why; releasing one is the owner's (`hold release` uses the migrate URL), so a
-- compromised worker can pin events but never unpin them.
GRANT SELECT ON legal_holds TO auditbridge_writer;
GRANT INSERT (tenant, since, until, reason, created_by) ON legal_holds TO auditbridge_writer;
-- Expiry (0009): only through the guarded SECURITY DEFINER path, which checks the policies
-- and the holds itself; the writer can read the receipts it signed.
GRANT SELECT ON retention_receipts TO auditbridge_writer;
GRANT EXECUTE ON FUNCTION auditbridge_expiry_begin(text),
    auditbridge_expire_partition(text, text[], text[], boolean, bigint[], bytea[], integer,
                                 integer),
    auditbridge_expire_dead_letters(integer), auditbridge_generation_of(bigint)
    TO auditbridge_writer;
-- dead_letters: INSERT of what ingest refuses; SELECT because `ON CONFLICT` reads its
-- arbiter columns. No UPDATE or DELETE: a writer cannot make a dead letter disappear.
GRANT SELECT ON dead_letters TO auditbridge_writer;
GRANT INSERT (stream, stream_seq, stream_stored_at, subject, payload, kind, reason, replay_of)
    ON dead_letters TO auditbridge_writer;
-- Dead-letter replay (0011): `auditbridge dead-letters replay` runs as the writer and records
-- each replay (the nonce, the payload's hash, who) and where JetStream stored it; the worker
-- records its verdict. The columns of the request are never updated, so the link a replay
-- makes cannot be moved to another dead letter or payload afterwards. No DELETE.
GRANT SELECT ON dead_letter_replays TO auditbridge_writer;
GRANT INSERT (dead_letter_id, nonce, corrected, payload_sha256, requested_by)
    ON dead_letter_replays TO auditbridge_writer;
GRANT UPDATE (stream, stream_seq, published_at, result, event_id, new_dead_letter_id, decided_at)
    ON dead_letter_replays TO auditbridge_writer;
-- destinations: the relays' coordination state (created on first start, cursors, leases,
-- counters, last error). Whole rows, since every column but the name is the relay's to keep.
-- No DELETE: removing a destination's progress is an operator's decision.
GRANT SELECT, INSERT, UPDATE ON destinations TO auditbridge_writer;
-- The worker refuses to run on a schema that is not fully migrated.
GRANT SELECT ON _sqlx_migrations TO auditbridge_writer;
-- Per-destination dead letters (0005): the relay records an event a destination cannot take.
GRANT SELECT, INSERT ON destination_dead_letters TO auditbridge_writer;
-- Re-delivery (0012): `destinations redeliver` (as the writer) asks; the relay records what
-- happened. Which event, where it was and why it was first refused are never updated.
GRANT UPDATE (redeliver_requested_at, redeliver_requested_by, redelivered_at, attempts,
              last_attempt_at, last_reason)
    ON destination_dead_letters TO auditbridge_writer;
-- Outbox generations (0006): read by relays and the start-up check; only the owner writes
-- them (`auditbridge outbox rebase`).
GRANT SELECT ON outbox_generations TO auditbridge_writer;
-- The verifiable log (0007): the sequencer appends leaves, nodes and checkpoints. No UPDATE,
-- DELETE or TRUNCATE (and triggers refuse them to everyone).
GRANT SELECT, INSERT ON log_leaves, log_nodes, log_checkpoints TO auditbridge_writer;

-- The reader (`auditbridge serve`, `auditbridge status`): SELECT, nothing else.
GRANT SELECT ON audit_events, dead_letters, destinations, destination_dead_letters,
    outbox_generations, log_leaves, log_nodes, log_checkpoints, _sqlx_migrations,
    audit_event_ids, retention_settings, retention_policies, audit_partitions,
    legal_holds, retention_receipts, retention_pending, dead_letter_replays, api_sources,
    api_source_seen, api_source_rejects
    TO auditbridge_reader;
GRANT EXECUTE ON FUNCTION auditbridge_keep_s(text), auditbridge_generation_of(bigint)
    TO auditbridge_reader;

-- The poller (`auditbridge poll`, 0015): it publishes to JetStream like any producer and keeps
-- in PostgreSQL only what a takeover needs. api_sources: its row (created on first start,
-- cursor, lease, counters, last error). api_source_seen: the ids of a window's overlap, pruned
-- as it moves. api_source_rejects: items no mapping took; a replay records only its outcome.
-- Nothing of audit_events, dead_letters or the log.
GRANT SELECT, INSERT, UPDATE ON api_sources TO auditbridge_poller;
GRANT SELECT, INSERT, DELETE ON api_source_seen TO auditbridge_poller;
GRANT SELECT ON api_source_rejects TO auditbridge_poller;
GRANT INSERT (source, cursor, item_index, item, reason, kind) ON api_source_rejects
    TO auditbridge_poller;
GRANT UPDATE (replayed_at, replay_result, event_id) ON api_source_rejects TO auditbridge_poller;
GRANT SELECT ON _sqlx_migrations TO auditbridge_poller;
