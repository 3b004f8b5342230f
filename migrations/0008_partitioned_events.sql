-- Retention, part 1: `audit_events` partitioned by retention class and time (ARCHITECTURE.md,
-- "Retention"), so that expiry drops whole partitions and never deletes a row.
--
-- - The partition key is (retention_class, received_at). A row's class is the number of
--   seconds its tenant keeps events (0: forever) when it was written, so tenants with the
--   same policy share partitions and a partition's rows all become due together. The class
--   only places a row: what may expire is decided by the tenant's policy when expiry runs
--   (0009), so a writer that picks a wrong class can delay a drop, never hasten one.
-- - Age counts from `received_at` (producers choose `occurred_at`; a back-dated event must
--   not expire on arrival).
-- - PostgreSQL 15 refuses identity columns on partitioned tables: `seq` comes from the
--   sequence `audit_events_seq`, which carries on where the identity stopped.
-- - PostgreSQL refuses unique indexes that leave out the partition key, so exactly-once by
--   `id` moves to `audit_event_ids`: one narrow row per event, written by a statement
--   trigger in the same statement as the events, keyed by `id`. It also says where the
--   event is ((retention_class, received_at) prune to one partition, (tx_id, seq) is its
--   index there), which is how readers find an event by id: `audit_events` has no index on
--   `id`. An id stays in it after its event expired, so a re-send of an expired event is
--   still a duplicate, never stored twice.
-- - The existing table becomes the first partition, `audit_events_legacy`, unchanged (its
--   rows are not copied; their ids are): class 0 from the beginning of time to just after its
--   newest row. It is expired like any other partition, when every tenant in it is past its
--   retention.

-- What retention is configured to (written by `migrate` from the configuration).
CREATE TABLE retention_settings (
    singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The length of a partition, in seconds (AUDITBRIDGE_PARTITION_INTERVAL).
    partition_interval_s bigint  NOT NULL DEFAULT 86400
        CHECK (partition_interval_s BETWEEN 1 AND 366 * 86400),
    -- The default retention, in seconds (AUDITBRIDGE_RETENTION); NULL keeps forever.
    default_keep_s       bigint  CHECK (default_keep_s > 0),
    -- How long dead letters are kept (AUDITBRIDGE_DEAD_LETTER_RETENTION); NULL: forever.
    dead_letter_keep_s   bigint  CHECK (dead_letter_keep_s > 0),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
INSERT INTO retention_settings DEFAULT VALUES;

-- Per-tenant overrides (`[[retention]]`); `keep_s` NULL keeps the tenant's events forever.
CREATE TABLE retention_policies (
    tenant     text        COLLATE "C" PRIMARY KEY,
    keep_s     bigint      CHECK (keep_s > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- How long `tenant` keeps its events, in seconds; NULL: forever.
CREATE FUNCTION auditbridge_keep_s(tenant text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p.tenant IS NOT NULL THEN p.keep_s ELSE s.default_keep_s END
    FROM retention_settings s
    LEFT JOIN retention_policies p ON p.tenant = $1
$$;

-- Every partition of audit_events there is or was, with its bounds, and when expiry
-- dropped it (0009).
CREATE TABLE audit_partitions (
    name       text        PRIMARY KEY,
    class      bigint      NOT NULL CHECK (class >= 0),
    lower_at   timestamptz NOT NULL,
    upper_at   timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    dropped_at timestamptz,
    CHECK (lower_at < upper_at)
);
CREATE INDEX audit_partitions_class ON audit_partitions (class, lower_at);

-- The existing table, renamed with its indexes, so that the partitioned table takes the
-- names the code and the documentation use.
ALTER TABLE audit_events RENAME TO audit_events_legacy;
-- Its primary key on `id` goes: audit_event_ids holds every id, this table's included.
ALTER TABLE audit_events_legacy DROP CONSTRAINT audit_events_pkey;
ALTER INDEX audit_events_tenant_time RENAME TO audit_events_legacy_tenant_time;
ALTER INDEX audit_events_tenant_actor RENAME TO audit_events_legacy_tenant_actor;
ALTER INDEX audit_events_tenant_action RENAME TO audit_events_legacy_tenant_action;
ALTER INDEX audit_events_tenant_target RENAME TO audit_events_legacy_tenant_target;
ALTER INDEX audit_events_outbox_order RENAME TO audit_events_legacy_outbox_order;

-- `seq` continues from the identity's sequence.
CREATE SEQUENCE audit_events_seq AS bigint;
SELECT setval('audit_events_seq', s.last_value)
FROM pg_sequences s
WHERE s.schemaname = 'public'
  AND s.sequencename = (parse_ident(pg_get_serial_sequence('audit_events_legacy', 'seq')))[2]
  AND s.last_value IS NOT NULL;
ALTER TABLE audit_events_legacy ALTER COLUMN seq DROP IDENTITY;
ALTER TABLE audit_events_legacy ADD COLUMN retention_class bigint NOT NULL DEFAULT 0;
ALTER TABLE audit_events_legacy ALTER COLUMN retention_class DROP DEFAULT;
ALTER TABLE audit_events_legacy ADD CONSTRAINT audit_events_retention_class_check
    CHECK (retention_class >= 0);
ALTER TABLE audit_events_legacy ALTER COLUMN tx_id DROP DEFAULT;
ALTER TABLE audit_events_legacy ALTER COLUMN received_at DROP DEFAULT;
-- The parent's row trigger is cloned onto every partition, this one included.
DROP TRIGGER audit_events_no_update_delete ON audit_events_legacy;

CREATE TABLE audit_events (
    id              uuid        NOT NULL,
    seq             bigint      NOT NULL DEFAULT nextval('audit_events_seq'),
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    tenant          text        COLLATE "C" NOT NULL,
    action          text        COLLATE "C" NOT NULL,
    outcome         text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    actor_id        text        NOT NULL,
    target_id       text,
    source          text        NOT NULL,
    event           jsonb       NOT NULL,
    retention_class bigint      NOT NULL DEFAULT 0,
    CONSTRAINT audit_events_retention_class_check CHECK (retention_class >= 0),
    CONSTRAINT audit_events_outcome_check
        CHECK (outcome IN ('success', 'failure', 'denied', 'unknown'))
) PARTITION BY RANGE (retention_class, received_at);
ALTER SEQUENCE audit_events_seq OWNED BY audit_events.seq;

-- The indexes of 0001 and 0003 but the one on `id` (see audit_event_ids). Attaching the
-- legacy table adopts its equivalent indexes instead of building them again.
CREATE INDEX audit_events_tenant_time ON audit_events (tenant, occurred_at, id);
CREATE INDEX audit_events_tenant_actor ON audit_events (tenant, actor_id, occurred_at, id);
CREATE INDEX audit_events_tenant_action ON audit_events (tenant, action, occurred_at);
CREATE INDEX audit_events_tenant_target ON audit_events (tenant, target_id, occurred_at, id)
    WHERE target_id IS NOT NULL;
CREATE INDEX audit_events_outbox_order ON audit_events (tx_id, seq);

-- Immutability, as in 0001. The row trigger is cloned onto each partition; TRUNCATE
-- triggers are not, so every partition gets its own (auditbridge_ensure_partitions).
CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_update_delete;
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate;

-- Exactly-once by id, across partitions.
CREATE TABLE audit_event_ids (
    id              uuid        NOT NULL,
    retention_class bigint      NOT NULL DEFAULT 0,
    received_at     timestamptz NOT NULL,
    tx_id           xid8        NOT NULL,
    seq             bigint      NOT NULL,
    CONSTRAINT audit_event_ids_pkey PRIMARY KEY (id)
);
INSERT INTO audit_event_ids (id, retention_class, received_at, tx_id, seq)
    SELECT id, 0, received_at, tx_id, seq FROM audit_events_legacy;

CREATE TRIGGER audit_event_ids_no_update_delete BEFORE UPDATE OR DELETE ON audit_event_ids
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_event_ids_no_truncate BEFORE TRUNCATE ON audit_event_ids
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
ALTER TABLE audit_event_ids ENABLE ALWAYS TRIGGER audit_event_ids_no_update_delete;
ALTER TABLE audit_event_ids ENABLE ALWAYS TRIGGER audit_event_ids_no_truncate;

-- Every statement that inserts events notes their ids, in the same statement: an id stored
-- already fails it with a unique violation on audit_event_ids_pkey (the writer then takes
-- the path that skips stored ids), and two batches racing with one id cannot both commit.
-- SECURITY DEFINER: the writer cannot insert ids of its own. ENABLE ALWAYS:
-- `session_replication_role = replica` does not turn exactly-once off.
CREATE FUNCTION audit_events_note_ids() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO public.audit_event_ids (id, retention_class, received_at, tx_id, seq)
        SELECT id, retention_class, received_at, tx_id, seq FROM new_events;
    RETURN NULL;
END;
$$;
CREATE TRIGGER audit_events_note_ids
    AFTER INSERT ON audit_events REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_note_ids();
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_note_ids;

-- The legacy table: class 0, from the beginning of time to just after its newest row, so
-- that no new row goes into it. An empty one (a new database) is dropped.
DO $$
DECLARE
    upper timestamptz := (SELECT max(received_at) + interval '1 microsecond'
                          FROM audit_events_legacy);
BEGIN
    IF upper IS NULL THEN
        DROP TABLE audit_events_legacy;
        RETURN;
    END IF;
    EXECUTE format(
        'ALTER TABLE audit_events ATTACH PARTITION audit_events_legacy '
        'FOR VALUES FROM (0, MINVALUE) TO (0, %L)', upper);
    ALTER TABLE audit_events_legacy ENABLE ALWAYS TRIGGER audit_events_no_update_delete;
    ALTER TABLE audit_events_legacy ENABLE ALWAYS TRIGGER audit_events_no_truncate;
    INSERT INTO audit_partitions (name, class, lower_at, upper_at)
        VALUES ('audit_events_legacy', 0, '-infinity', upper);
END
$$;

-- Creates the partitions that are missing for every class in use (0 and each policy's),
-- from one interval before now to three intervals ahead. Run by `migrate` once it stored
-- the configured interval and policies (so not here), and by the workers (every quarter
-- interval, and at once when a row finds no partition). Each
-- partition is created, then attached, then given its TRUNCATE trigger, all ENABLE ALWAYS.
-- Returns how many it created.
CREATE FUNCTION auditbridge_ensure_partitions() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    step    bigint := (SELECT partition_interval_s FROM public.retention_settings);
    now_s   bigint := floor(extract(epoch FROM now()))::bigint;
    stop_s  bigint;
    cls     bigint;
    cur     bigint;
    nxt     bigint;
    found_s bigint;
    part    text;
    made    integer := 0;
BEGIN
    -- One creator at a time (two workers would both try the same partition).
    PERFORM pg_advisory_xact_lock(7243586041907425122);
    stop_s := (now_s / step + 3) * step;
    FOR cls IN
        SELECT 0 UNION SELECT keep_s FROM public.retention_policies WHERE keep_s IS NOT NULL
        UNION SELECT default_keep_s FROM public.retention_settings
              WHERE default_keep_s IS NOT NULL
        ORDER BY 1
    LOOP
        cur := (now_s / step - 1) * step;
        WHILE cur < stop_s LOOP
            -- A partition (of any interval) that covers `cur`, or did until expiry dropped
            -- it (a range that expired is not made again): carry on after it.
            SELECT floor(extract(epoch FROM p.upper_at))::bigint INTO found_s
            FROM public.audit_partitions p
            WHERE p.class = cls AND p.lower_at <= to_timestamp(cur) AND p.upper_at > to_timestamp(cur)
              AND (p.dropped_at IS NOT NULL OR to_regclass(format('public.%I', p.name)) IS NOT NULL);
            IF found_s IS NOT NULL THEN
                cur := found_s;
                CONTINUE;
            END IF;
            nxt := (cur / step + 1) * step;
            SELECT least(nxt, min(floor(extract(epoch FROM p.lower_at))::bigint)) INTO nxt
            FROM public.audit_partitions p
            WHERE p.class = cls AND p.lower_at > to_timestamp(cur) AND p.lower_at < to_timestamp(nxt)
              AND (p.dropped_at IS NOT NULL OR to_regclass(format('public.%I', p.name)) IS NOT NULL);
            part := format('audit_events_c%s_%s', cls,
                           to_char(to_timestamp(cur) AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS'));
            EXECUTE format('CREATE TABLE public.%I (LIKE public.audit_events '
                           'INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            EXECUTE format('ALTER TABLE public.audit_events ATTACH PARTITION public.%I '
                           'FOR VALUES FROM (%s, %L) TO (%s, %L)',
                           part, cls, to_timestamp(cur), cls, to_timestamp(nxt));
            EXECUTE format('CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON public.%I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION public.audit_events_refuse_change()',
                           part);
            EXECUTE format('ALTER TABLE public.%I ENABLE ALWAYS TRIGGER audit_events_no_truncate', part);
            EXECUTE format('ALTER TABLE public.%I ENABLE ALWAYS TRIGGER audit_events_no_update_delete', part);
            -- Like the parent: nobody but the owner reads or writes a partition directly.
            EXECUTE format('REVOKE ALL ON public.%I FROM PUBLIC', part);
            INSERT INTO public.audit_partitions (name, class, lower_at, upper_at)
                VALUES (part, cls, to_timestamp(cur), to_timestamp(nxt))
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
