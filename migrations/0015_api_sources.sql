-- Pull sources (`[[sources]]` with `type = "api"`, run by `auditbridge poll`, issue 14): an
-- audit-log API polled page by page. One row per source keeps its cursor (where the next page
-- starts) and the lease of the one poller among those running that polls it, so any instance
-- can take over exactly where the last left off. The cursor moves only after JetStream
-- acknowledged every event of the page and, in the same transaction, the page's items that
-- could not be mapped were kept in `api_source_rejects`; every write is fenced by the lease.
CREATE TABLE api_sources (
    name             text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 63),
    cursor_style     text        NOT NULL CHECK (cursor_style IN ('link', 'token', 'window')),
    -- NULL until the first page is accounted for; its shape is the style's (README, "Pull
    -- sources").
    cursor           jsonb,
    cursor_moved_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    lease_holder     text,
    lease_expires_at timestamptz,
    polls_total      bigint      NOT NULL DEFAULT 0,
    pages_total      bigint      NOT NULL DEFAULT 0,
    events_total     bigint      NOT NULL DEFAULT 0,
    rejected_total   bigint      NOT NULL DEFAULT 0,
    -- Errors by kind: {"http_5xx": 3, "rate_limited": 1, …}.
    errors           jsonb       NOT NULL DEFAULT '{}',
    last_poll_at     timestamptz,
    -- The newest `occurred_at` of an event the source published: lag is now minus this.
    newest_event_at  timestamptz,
    last_error       text,
    last_error_kind  text,
    last_error_at    timestamptz,
    -- The API refused our credentials (401/403): someone must look.
    failing          boolean     NOT NULL DEFAULT false
);

-- A `window` source's ids already published whose remote time lies in the overlap, so that a
-- remote event fetched again (also with content the remote side changed) is not published
-- again; pruned as the window moves on.
CREATE TABLE api_source_seen (
    source      text        NOT NULL REFERENCES api_sources (name),
    event_id    uuid        NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX api_source_seen_by_time ON api_source_seen (source, occurred_at);

-- Items of a page that no mapping took (no trustworthy tenant, so no subject to publish
-- them on): kept with the cursor the page was fetched at, the raw item and the reason, shown by
-- `status` and replayable after a mapping fix (`auditbridge poll NAME --replay-rejects`).
CREATE TABLE api_source_rejects (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source        text        NOT NULL REFERENCES api_sources (name),
    cursor        jsonb,
    item_index    integer     NOT NULL CHECK (item_index >= 0),
    -- The item's JSON text, or `{"auditbridge_withheld": …}` (its size and SHA-256) for an
    -- item over 1 MiB.
    item          text        NOT NULL,
    reason        text        NOT NULL CHECK (length(reason) <= 2000),
    kind          text        NOT NULL CHECK (length(kind) <= 64),
    rejected_at   timestamptz NOT NULL DEFAULT now(),
    -- A replay after a mapping fix: when, and what became of it.
    replayed_at   timestamptz,
    replay_result text        CHECK (length(replay_result) <= 2000),
    event_id      uuid
);
CREATE INDEX api_source_rejects_open ON api_source_rejects (source, id) WHERE replayed_at IS NULL;
