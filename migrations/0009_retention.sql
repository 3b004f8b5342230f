-- Retention, part 2: legal holds, signed receipts, and the one guarded path by which events
-- leave the trail (ARCHITECTURE.md, "Retention").
--
-- Expiry drops whole partitions of audit_events (0008), in one transaction per partition:
--   1. auditbridge_expiry_begin(partition) locks the holds and the policies (SHARE: a hold
--      or policy written meanwhile waits for this transaction) and the partition (SHARE: no
--      row can arrive in it), then counts what the partition holds per tenant, whether each
--      tenant is due under its policy and which holds pin it, into retention_pending;
--   2. the caller (a worker, `auditbridge retention run`) writes and signs each tenant's
--      receipt with the log's key;
--   3. auditbridge_expire_partition(partition, …) checks again that every tenant is due and
--      nothing is held, stores the receipts from what step 1 counted (not from the caller's
--      numbers), and drops the partition, waiting for its lock at most a few short times.
-- A run killed at any point rolls back whole: nothing is half done, and the next run starts
-- again from step 1. The functions are SECURITY DEFINER, owned by the owner role: workers
-- run as the writer, which cannot drop anything itself.

-- Legal holds: what they cover is the tenant's events that occurred in [since, until)
-- (either end open). Never deleted; released once, with who and when.
CREATE TABLE legal_holds (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant      text        COLLATE "C" NOT NULL,
    since       timestamptz,
    until       timestamptz,
    reason      text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 2000),
    created_by  text        NOT NULL CHECK (length(created_by) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    released_by text        CHECK (length(released_by) BETWEEN 1 AND 200),
    released_at timestamptz,
    CHECK (since IS NULL OR until IS NULL OR since < until),
    CHECK ((released_by IS NULL) = (released_at IS NULL))
);
CREATE INDEX legal_holds_in_force ON legal_holds (tenant) WHERE released_at IS NULL;

CREATE FUNCTION legal_holds_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.released_at IS NULL AND NEW.released_at IS NOT NULL
       AND (NEW.id, NEW.tenant, NEW.since, NEW.until, NEW.reason, NEW.created_by,
            NEW.created_at)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.tenant, OLD.since, OLD.until, OLD.reason, OLD.created_by,
            OLD.created_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'legal_holds: % is not allowed (a hold is only ever released, once)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER legal_holds_guard BEFORE UPDATE OR DELETE ON legal_holds
    FOR EACH ROW EXECUTE FUNCTION legal_holds_guard();
CREATE TRIGGER legal_holds_no_truncate BEFORE TRUNCATE ON legal_holds
    FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
ALTER TABLE legal_holds ENABLE ALWAYS TRIGGER legal_holds_guard;
ALTER TABLE legal_holds ENABLE ALWAYS TRIGGER legal_holds_no_truncate;

-- One receipt per tenant and dropped partition: what left, under which policy, and the
-- tenant's signed log at the cut (its leaves stay, so earlier proofs stay valid).
CREATE TABLE retention_receipts (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant         text        COLLATE "C" NOT NULL,
    partition_name text        NOT NULL,
    keep_s         bigint      NOT NULL,
    events         bigint      NOT NULL CHECK (events >= 0),
    -- The log indexes of the events that left (a multirange: they need not be contiguous).
    log_indexes    int8multirange NOT NULL,
    first_received timestamptz,
    last_received  timestamptz,
    first_occurred timestamptz,
    last_occurred  timestamptz,
    -- Events that left before the sequencer logged them, and, per destination, events that
    -- left before it was delivered: never silent (also logged by the expiring process).
    unlogged       bigint      NOT NULL DEFAULT 0,
    undelivered    jsonb       NOT NULL DEFAULT '{}',
    -- The tenant's newest checkpoint at the cut.
    tree_size      bigint,
    root           bytea       CHECK (root IS NULL OR octet_length(root) = 32),
    signed         boolean     NOT NULL,
    note           text        NOT NULL,
    expired_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX retention_receipts_tenant ON retention_receipts (tenant, id);
CREATE TRIGGER retention_receipts_no_update_delete BEFORE UPDATE OR DELETE
    ON retention_receipts FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
CREATE TRIGGER retention_receipts_no_truncate BEFORE TRUNCATE ON retention_receipts
    FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
ALTER TABLE retention_receipts ENABLE ALWAYS TRIGGER retention_receipts_no_update_delete;
ALTER TABLE retention_receipts ENABLE ALWAYS TRIGGER retention_receipts_no_truncate;

-- What auditbridge_expiry_begin counted, for auditbridge_expire_partition in the same
-- transaction (rows of another transaction are never used; a killed run leaves none).
CREATE TABLE retention_pending (
    tx             xid8        NOT NULL,
    partition_name text        NOT NULL,
    tenant         text        COLLATE "C" NOT NULL,
    keep_s         bigint,
    due            boolean     NOT NULL,
    held_by        bigint[]    NOT NULL,
    events         bigint      NOT NULL,
    log_indexes    int8multirange NOT NULL,
    first_received timestamptz,
    last_received  timestamptz,
    first_occurred timestamptz,
    last_occurred  timestamptz,
    unlogged       bigint      NOT NULL,
    undelivered    jsonb       NOT NULL,
    PRIMARY KEY (tx, partition_name, tenant)
);

-- The outbox generation of a row by its seq (as crate::log's generation_sql).
CREATE FUNCTION auditbridge_generation_of(seq bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT g.generation FROM outbox_generations g
                     WHERE g.first_seq <= $1 ORDER BY g.first_seq DESC LIMIT 1), 0)
$$;

-- Step 1. The partition must exist and be listed. Waits at most 5 s for its locks.
CREATE FUNCTION auditbridge_expiry_begin(part text)
RETURNS SETOF retention_pending
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    p public.audit_partitions;
BEGIN
    SELECT * INTO p FROM public.audit_partitions a
    WHERE a.name = part AND a.dropped_at IS NULL
      AND EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = 'public.audit_events'::regclass
                    AND c.relname = part AND c.relnamespace = 'public'::regnamespace);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'expiry: % is not a partition of audit_events', part
            USING ERRCODE = 'undefined_table';
    END IF;
    SET LOCAL lock_timeout = '5s';
    LOCK TABLE public.legal_holds, public.retention_policies, public.retention_settings
        IN SHARE MODE;
    EXECUTE format('LOCK TABLE public.%I IN SHARE MODE', part);
    DELETE FROM public.retention_pending r
        WHERE r.tx = pg_current_xact_id() AND r.partition_name = part;
    EXECUTE format($q$
        INSERT INTO public.retention_pending
        SELECT pg_current_xact_id(), %L, t.tenant, public.auditbridge_keep_s(t.tenant),
               public.auditbridge_keep_s(t.tenant) IS NOT NULL
                   AND %L::timestamptz
                       + make_interval(secs => public.auditbridge_keep_s(t.tenant)) <= now(),
               ARRAY(SELECT h.id FROM public.legal_holds h
                     WHERE h.tenant = t.tenant AND h.released_at IS NULL
                       AND EXISTS (SELECT 1 FROM public.%I e
                                   WHERE e.tenant = t.tenant
                                     AND (h.since IS NULL OR e.occurred_at >= h.since)
                                     AND (h.until IS NULL OR e.occurred_at < h.until))
                     ORDER BY h.id),
               t.events, t.log_indexes, t.first_received, t.last_received,
               t.first_occurred, t.last_occurred, t.unlogged,
               COALESCE((SELECT jsonb_object_agg(d.name, d.n) FROM (
                   SELECT dst.name, count(*) AS n
                   FROM public.destinations dst
                   JOIN public.%I e ON e.tenant = t.tenant
                    AND (public.auditbridge_generation_of(e.seq), e.tx_id, e.seq)
                        > (dst.cursor_gen, dst.cursor_tx, dst.cursor_seq)
                   WHERE dst.name NOT LIKE '\_%%'
                   GROUP BY dst.name) d), '{}')
        FROM (
            SELECT e.tenant, count(*) AS events,
                   COALESCE(range_agg(int8range(l.log_index, l.log_index + 1))
                                FILTER (WHERE l.log_index IS NOT NULL),
                            '{}'::int8multirange) AS log_indexes,
                   min(e.received_at) AS first_received, max(e.received_at) AS last_received,
                   min(e.occurred_at) AS first_occurred, max(e.occurred_at) AS last_occurred,
                   count(*) FILTER (WHERE l.log_index IS NULL) AS unlogged
            FROM public.%I e
            LEFT JOIN public.log_leaves l ON l.event_id = e.id
            GROUP BY e.tenant
        ) t$q$, part, p.upper_at, part, part, part);
    RETURN QUERY SELECT * FROM public.retention_pending r
        WHERE r.tx = pg_current_xact_id() AND r.partition_name = part
        ORDER BY r.tenant;
END;
$$;

-- Step 3. `tenants`, `notes`, `tree_sizes` and `roots` are parallel arrays: one signed
-- receipt per tenant that step 1 counted, no more, no fewer. Drops the partition if every
-- tenant is due and nothing holds it (an empty partition: one interval after its end),
-- waiting for its lock at most `attempts` times `lock_ms`. Returns the events dropped.
CREATE FUNCTION auditbridge_expire_partition(
    part text, tenants text[], notes text[], signed boolean, tree_sizes bigint[],
    roots bytea[], lock_ms integer, attempts integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    p        public.audit_partitions;
    step     bigint := (SELECT partition_interval_s FROM public.retention_settings);
    counted  integer;
    blocking text;
    dropped  bigint;
    tries    integer := 0;
BEGIN
    SELECT * INTO p FROM public.audit_partitions a WHERE a.name = part AND a.dropped_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'expiry: % is not a partition of audit_events', part
            USING ERRCODE = 'undefined_table';
    END IF;
    SELECT count(*), sum(r.events) INTO counted, dropped FROM public.retention_pending r
        WHERE r.tx = pg_current_xact_id() AND r.partition_name = part;
    IF NOT EXISTS (SELECT 1 FROM pg_locks l
                   WHERE l.locktype = 'relation' AND l.granted
                     AND l.pid = pg_backend_pid()
                     AND l.relation = format('public.%I', part)::regclass
                     AND l.mode = 'ShareLock') THEN
        RAISE EXCEPTION 'expiry: call auditbridge_expiry_begin(%) first, in this transaction', part
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT string_agg(format('%s (%s)', r.tenant,
                             CASE WHEN cardinality(r.held_by) > 0
                                  THEN 'held by ' || array_to_string(r.held_by, ', ')
                                  WHEN r.keep_s IS NULL THEN 'kept forever'
                                  ELSE 'not yet due' END), ', ')
        INTO blocking
        FROM public.retention_pending r
        WHERE r.tx = pg_current_xact_id() AND r.partition_name = part
          AND (NOT r.due OR cardinality(r.held_by) > 0);
    IF blocking IS NOT NULL THEN
        RAISE EXCEPTION 'expiry: % cannot be dropped: %', part, blocking
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF counted = 0 AND p.upper_at + make_interval(secs => step) > now() THEN
        RAISE EXCEPTION 'expiry: % is empty but rows may still arrive in it', part
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF cardinality(tenants) IS DISTINCT FROM counted
       OR cardinality(notes) IS DISTINCT FROM cardinality(tenants)
       OR cardinality(tree_sizes) IS DISTINCT FROM cardinality(tenants)
       OR cardinality(roots) IS DISTINCT FROM cardinality(tenants)
       OR EXISTS (SELECT 1 FROM public.retention_pending r
                  WHERE r.tx = pg_current_xact_id() AND r.partition_name = part
                    AND r.tenant <> ALL (tenants)) THEN
        RAISE EXCEPTION 'expiry: % needs one receipt for each of its % tenants', part, counted
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO public.retention_receipts
        (tenant, partition_name, keep_s, events, log_indexes, first_received, last_received,
         first_occurred, last_occurred, unlogged, undelivered, tree_size, root, signed, note)
    SELECT r.tenant, part, r.keep_s, r.events, r.log_indexes, r.first_received,
           r.last_received, r.first_occurred, r.last_occurred, r.unlogged, r.undelivered,
           g.tree_size, g.root, signed, g.note
    FROM public.retention_pending r
    JOIN UNNEST(tenants, notes, tree_sizes, roots) AS g(tenant, note, tree_size, root)
      ON g.tenant = r.tenant
    WHERE r.tx = pg_current_xact_id() AND r.partition_name = part;
    DELETE FROM public.retention_pending r
        WHERE r.tx = pg_current_xact_id() AND r.partition_name = part;
    -- Dropping a partition takes an ACCESS EXCLUSIVE lock on audit_events too: ask for it
    -- only briefly, so that ingest, queued behind the request, never waits long.
    PERFORM set_config('lock_timeout', format('%sms', greatest(lock_ms, 1)), true);
    LOOP
        BEGIN
            EXECUTE format('DROP TABLE public.%I', part);
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            tries := tries + 1;
            IF tries >= greatest(attempts, 1) THEN
                RAISE;
            END IF;
            PERFORM pg_sleep(lock_ms * tries / 1000.0);
        END;
    END LOOP;
    UPDATE public.audit_partitions SET dropped_at = now() WHERE name = part;
    RETURN COALESCE(dropped, 0);
END;
$$;

-- Dead letters (of ingest and of destinations) older than AUDITBRIDGE_DEAD_LETTER_RETENTION,
-- at most `max_rows` of each per call. Returns how many rows went.
CREATE FUNCTION auditbridge_expire_dead_letters(max_rows integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    keep_s bigint := (SELECT dead_letter_keep_s FROM public.retention_settings);
    n      bigint;
    m      bigint;
BEGIN
    IF keep_s IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM public.dead_letters WHERE id IN (
        SELECT id FROM public.dead_letters
        WHERE received_at < now() - make_interval(secs => keep_s)
        ORDER BY received_at LIMIT max_rows);
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM public.destination_dead_letters WHERE id IN (
        SELECT id FROM public.destination_dead_letters
        WHERE created_at < now() - make_interval(secs => keep_s)
        ORDER BY created_at LIMIT max_rows);
    GET DIAGNOSTICS m = ROW_COUNT;
    RETURN n + m;
END;
$$;
CREATE INDEX dead_letters_received_at ON dead_letters (received_at);
CREATE INDEX destination_dead_letters_created_at ON destination_dead_letters (created_at);
