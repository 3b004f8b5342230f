-- Retention, part 3: the guarded path hardened against its callers (ARCHITECTURE.md,
-- "Retention"; found by an attacker's review of 0008 and 0009).
--
-- - Every function the guarded path runs resolves names in pg_catalog, then public, then
--   pg_temp last (a caller's temporary `pg_locks` or `retention_policies` could otherwise
--   stand in for the real ones), and qualifies them besides.
-- - Every SECURITY DEFINER function runs with TimeZone UTC and DateStyle ISO, and passes
--   times as parameters, never as text read back under the caller's settings (which could
--   shift a partition's bounds, or its due time, by days).
-- - Expiry refuses a snapshot older than its locks (only READ COMMITTED, whose next
--   statement sees every hold committed before the lock), a partition that has not ended,
--   a receipt list that is not exactly the counted tenants (a NULL among them included),
--   and counts a row's log index only from its own tenant's log.
-- - Partition maintenance works in microseconds: a legacy table whose bound is not on a
--   second no longer stops it.

CREATE OR REPLACE FUNCTION auditbridge_keep_s(tenant text) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT CASE WHEN p.tenant IS NOT NULL THEN p.keep_s ELSE s.default_keep_s END
    FROM public.retention_settings s
    LEFT JOIN public.retention_policies p ON p.tenant = $1
$$;

CREATE OR REPLACE FUNCTION auditbridge_generation_of(seq bigint) RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT COALESCE((SELECT g.generation FROM public.outbox_generations g
                     WHERE g.first_seq <= $1 ORDER BY g.first_seq DESC LIMIT 1), 0)
$$;

CREATE OR REPLACE FUNCTION audit_events_note_ids() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    INSERT INTO public.audit_event_ids (id, retention_class, received_at, tx_id, seq)
        SELECT id, retention_class, received_at, tx_id, seq FROM new_events;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION auditbridge_ensure_partitions() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
DECLARE
    step   interval := make_interval(secs => (SELECT partition_interval_s
                                              FROM public.retention_settings));
    origin timestamptz := pg_catalog.to_timestamp(0);
    stop   timestamptz;
    cls    bigint;
    cur    timestamptz;
    nxt    timestamptz;
    found  timestamptz;
    part   text;
    made   integer := 0;
BEGIN
    -- One creator at a time (two workers would both try the same partition).
    PERFORM pg_catalog.pg_advisory_xact_lock(7243586041907425122);
    stop := pg_catalog.date_bin(step, now(), origin) + 3 * step;
    FOR cls IN
        SELECT 0 UNION SELECT keep_s FROM public.retention_policies WHERE keep_s IS NOT NULL
        UNION SELECT default_keep_s FROM public.retention_settings
              WHERE default_keep_s IS NOT NULL
        ORDER BY 1
    LOOP
        cur := pg_catalog.date_bin(step, now(), origin) - step;
        WHILE cur < stop LOOP
            -- A partition (of any interval) that covers `cur`, or did until expiry dropped
            -- it (a range that expired is not made again): carry on after it.
            SELECT p.upper_at INTO found
            FROM public.audit_partitions p
            WHERE p.class = cls AND p.lower_at <= cur AND p.upper_at > cur
              AND (p.dropped_at IS NOT NULL
                   OR pg_catalog.to_regclass(format('public.%I', p.name)) IS NOT NULL);
            IF found IS NOT NULL THEN
                cur := found;
                CONTINUE;
            END IF;
            nxt := pg_catalog.date_bin(step, cur, origin) + step;
            SELECT least(nxt, min(p.lower_at)) INTO nxt
            FROM public.audit_partitions p
            WHERE p.class = cls AND p.lower_at > cur AND p.lower_at < nxt
              AND (p.dropped_at IS NOT NULL
                   OR pg_catalog.to_regclass(format('public.%I', p.name)) IS NOT NULL);
            part := format('audit_events_c%s_%s', cls,
                           to_char(cur AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS'));
            IF extract(microseconds FROM cur)::bigint % 1000000 <> 0 THEN
                part := part || to_char(cur AT TIME ZONE 'UTC', '"_"US');
            END IF;
            EXECUTE format('CREATE TABLE public.%I (LIKE public.audit_events '
                           'INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            -- ISO text in UTC (this function's settings): read back as the same instant.
            EXECUTE format('ALTER TABLE public.audit_events ATTACH PARTITION public.%I '
                           'FOR VALUES FROM (%s, %L) TO (%s, %L)',
                           part, cls, cur, cls, nxt);
            EXECUTE format('CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON public.%I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION public.audit_events_refuse_change()',
                           part);
            EXECUTE format('ALTER TABLE public.%I ENABLE ALWAYS TRIGGER audit_events_no_truncate', part);
            EXECUTE format('ALTER TABLE public.%I ENABLE ALWAYS TRIGGER audit_events_no_update_delete', part);
            -- Like the parent: nobody but the owner reads or writes a partition directly.
            EXECUTE format('REVOKE ALL ON public.%I FROM PUBLIC', part);
            INSERT INTO public.audit_partitions (name, class, lower_at, upper_at)
                VALUES (part, cls, cur, nxt)
                ON CONFLICT (name) DO UPDATE
                    SET lower_at = EXCLUDED.lower_at, upper_at = EXCLUDED.upper_at,
                        created_at = now(), dropped_at = NULL;
            made := made + 1;
            cur := nxt;
        END LOOP;
    END LOOP;
    RETURN made;
END;
$$;

CREATE OR REPLACE FUNCTION auditbridge_expiry_begin(part text)
RETURNS SETOF retention_pending
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
DECLARE
    p public.audit_partitions;
BEGIN
    -- A snapshot taken before the locks below would not see a hold committed meanwhile.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'expiry runs only at READ COMMITTED (this transaction is %)',
            current_setting('transaction_isolation')
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT * INTO p FROM public.audit_partitions a
    WHERE a.name = part AND a.dropped_at IS NULL
      AND EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = 'public.audit_events'::regclass
                    AND c.relname = part AND c.relnamespace = 'public'::regnamespace);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'expiry: % is not a partition of audit_events', part
            USING ERRCODE = 'undefined_table';
    END IF;
    IF p.upper_at > clock_timestamp() THEN
        RAISE EXCEPTION 'expiry: % has not ended (it ends at %)', part, p.upper_at
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SET LOCAL lock_timeout = '5s';
    LOCK TABLE public.legal_holds, public.retention_policies, public.retention_settings
        IN SHARE MODE;
    EXECUTE format('LOCK TABLE public.%I IN SHARE MODE', part);
    DELETE FROM public.retention_pending r
        WHERE r.tx = pg_catalog.pg_current_xact_id() AND r.partition_name = part;
    EXECUTE format($q$
        INSERT INTO public.retention_pending
        SELECT pg_catalog.pg_current_xact_id(), $2, t.tenant,
               public.auditbridge_keep_s(t.tenant),
               public.auditbridge_keep_s(t.tenant) IS NOT NULL
                   AND $1 + make_interval(secs => public.auditbridge_keep_s(t.tenant))
                       <= clock_timestamp(),
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
            LEFT JOIN public.log_leaves l ON l.event_id = e.id AND l.tenant = e.tenant
            GROUP BY e.tenant
        ) t$q$, part, part, part) USING p.upper_at, part;
    RETURN QUERY SELECT * FROM public.retention_pending r
        WHERE r.tx = pg_catalog.pg_current_xact_id() AND r.partition_name = part
        ORDER BY r.tenant;
END;
$$;

CREATE OR REPLACE FUNCTION auditbridge_expire_partition(
    part text, tenants text[], notes text[], signed boolean, tree_sizes bigint[],
    roots bytea[], lock_ms integer, attempts integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
DECLARE
    p        public.audit_partitions;
    step     bigint := (SELECT partition_interval_s FROM public.retention_settings);
    counted  integer;
    stored   integer;
    blocking text;
    dropped  bigint;
    tries    integer := 0;
BEGIN
    SELECT * INTO p FROM public.audit_partitions a WHERE a.name = part AND a.dropped_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'expiry: % is not a partition of audit_events', part
            USING ERRCODE = 'undefined_table';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                   WHERE l.locktype = 'relation' AND l.granted
                     AND l.pid = pg_catalog.pg_backend_pid()
                     AND l.relation = format('public.%I', part)::regclass
                     AND l.mode = 'ShareLock') THEN
        RAISE EXCEPTION 'expiry: call auditbridge_expiry_begin(%) first, in this transaction', part
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT count(*), sum(r.events) INTO counted, dropped FROM public.retention_pending r
        WHERE r.tx = pg_catalog.pg_current_xact_id() AND r.partition_name = part;
    SELECT string_agg(format('%s (%s)', r.tenant,
                             CASE WHEN cardinality(r.held_by) > 0
                                  THEN 'held by ' || array_to_string(r.held_by, ', ')
                                  WHEN r.keep_s IS NULL THEN 'kept forever'
                                  ELSE 'not yet due' END), ', ')
        INTO blocking
        FROM public.retention_pending r
        WHERE r.tx = pg_catalog.pg_current_xact_id() AND r.partition_name = part
          AND (NOT r.due OR cardinality(r.held_by) > 0);
    IF blocking IS NOT NULL THEN
        RAISE EXCEPTION 'expiry: % cannot be dropped: %', part, blocking
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF counted = 0 AND p.upper_at + make_interval(secs => step) > clock_timestamp() THEN
        RAISE EXCEPTION 'expiry: % is empty but rows may still arrive in it', part
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Exactly one receipt for each tenant counted: the same set, no NULL, no repeat.
    IF tenants IS NULL OR notes IS NULL OR tree_sizes IS NULL OR roots IS NULL
       OR array_position(tenants, NULL) IS NOT NULL OR array_position(notes, NULL) IS NOT NULL
       OR cardinality(notes) IS DISTINCT FROM cardinality(tenants)
       OR cardinality(tree_sizes) IS DISTINCT FROM cardinality(tenants)
       OR cardinality(roots) IS DISTINCT FROM cardinality(tenants)
       OR (SELECT count(DISTINCT t) FROM unnest(tenants) t) <> cardinality(tenants)
       OR cardinality(tenants) <> counted
       OR EXISTS (SELECT 1 FROM public.retention_pending r
                  WHERE r.tx = pg_catalog.pg_current_xact_id() AND r.partition_name = part
                    AND NOT (r.tenant = ANY (tenants))) THEN
        RAISE EXCEPTION 'expiry: % needs one receipt for each of its % tenants', part, counted
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO public.retention_receipts
        (tenant, partition_name, keep_s, events, log_indexes, first_received, last_received,
         first_occurred, last_occurred, unlogged, undelivered, tree_size, root, signed, note,
         expired_at)
    SELECT r.tenant, part, r.keep_s, r.events, r.log_indexes, r.first_received,
           r.last_received, r.first_occurred, r.last_occurred, r.unlogged, r.undelivered,
           g.tree_size, g.root, signed, g.note, clock_timestamp()
    FROM public.retention_pending r
    JOIN UNNEST(tenants, notes, tree_sizes, roots) AS g(tenant, note, tree_size, root)
      ON g.tenant = r.tenant
    WHERE r.tx = pg_catalog.pg_current_xact_id() AND r.partition_name = part;
    GET DIAGNOSTICS stored = ROW_COUNT;
    IF stored <> counted THEN
        RAISE EXCEPTION 'expiry: % stored % receipts for % tenants', part, stored, counted
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM public.retention_pending r
        WHERE r.tx = pg_catalog.pg_current_xact_id() AND r.partition_name = part;
    -- Dropping a partition takes an ACCESS EXCLUSIVE lock on audit_events too: ask for it
    -- only briefly, so that ingest, queued behind the request, never waits long.
    PERFORM set_config('lock_timeout', format('%sms', least(greatest(lock_ms, 1), 1000)), true);
    LOOP
        BEGIN
            EXECUTE format('DROP TABLE public.%I', part);
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            tries := tries + 1;
            IF tries >= least(greatest(attempts, 1), 100) THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.pg_sleep(least(greatest(lock_ms, 1), 1000) * tries / 1000.0);
        END;
    END LOOP;
    UPDATE public.audit_partitions SET dropped_at = clock_timestamp() WHERE name = part;
    RETURN COALESCE(dropped, 0);
END;
$$;

CREATE OR REPLACE FUNCTION auditbridge_expire_dead_letters(max_rows integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
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
        ORDER BY received_at LIMIT greatest(max_rows, 0));
    GET DIAGNOSTICS n = ROW_COUNT;
    -- (destination_dead_letters has no id column: its key is (destination, event_id).)
    DELETE FROM public.destination_dead_letters WHERE (destination, event_id) IN (
        SELECT destination, event_id FROM public.destination_dead_letters
        WHERE created_at < now() - make_interval(secs => keep_s)
        ORDER BY created_at LIMIT greatest(max_rows, 0));
    GET DIAGNOSTICS m = ROW_COUNT;
    RETURN n + m;
END;
$$;
