//! Metric names, units and descriptions of the services, decided in one place; the Prometheus
//! recorder; logs. (The producer client's metrics are named in `auditbridge-client`: it is
//! embedded in other services and depends on none of ours.)

use std::sync::OnceLock;
use std::time::Duration;

use auditbridge_config::LogFormat;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const EVENTS_RECEIVED: &str = "auditbridge_events_received_total";
pub const EVENTS_PERSISTED: &str = "auditbridge_events_persisted_total";
pub const EVENTS_DUPLICATE: &str = "auditbridge_events_duplicate_total";
/// Label `kind`: oversize | not_json | schema | subject_mismatch | db_rejected | conflict.
pub const EVENTS_DEAD_LETTERED: &str = "auditbridge_events_dead_lettered_total";
/// A re-sent id with other content than the stored event (also a `conflict` dead letter).
pub const EVENTS_CONFLICT: &str = "auditbridge_events_conflict_total";
/// Events stored with values redacted by the ingest rules (`[[redact]]`).
pub const EVENTS_REDACTED: &str = "auditbridge_events_redacted_total";
pub const BATCH_SIZE: &str = "auditbridge_batch_size_messages";
/// Bytes of the messages of one batch (subjects, headers and payloads, as JetStream counts
/// them), at most `AUDITBRIDGE_BATCH_MAX_BYTES` but for a single larger message.
pub const BATCH_BYTES: &str = "auditbridge_batch_size_bytes";
pub const PERSIST_DURATION: &str = "auditbridge_persist_duration_seconds";
pub const PUBLISH_TO_COMMIT: &str = "auditbridge_publish_to_commit_seconds";
/// Label `reason`: unavailable | rejected | refuses_writes | dead_letters_refused.
pub const PERSIST_FAILURES: &str = "auditbridge_persist_failures_total";
pub const ACK_FAILURES: &str = "auditbridge_ack_failures_total";
pub const CONSUMER_PENDING: &str = "auditbridge_consumer_pending_messages";
pub const CONSUMER_ACK_PENDING: &str = "auditbridge_consumer_ack_pending_messages";
pub const DATABASE_UP: &str = "auditbridge_database_up";
pub const NATS_UP: &str = "auditbridge_nats_up";

// `auditbridge serve`.
/// Labels `route` (the matched route pattern, e.g. `/v1/events/{id}`) and `status`.
pub const API_REQUESTS: &str = "auditbridge_api_requests_total";
/// Label `route`. For the live tail, until the stream starts.
pub const API_REQUEST_DURATION: &str = "auditbridge_api_request_duration_seconds";
pub const API_TAIL_CLIENTS: &str = "auditbridge_api_tail_clients";
/// Label `reason`: slow | database.
pub const API_TAIL_DISCONNECTS: &str = "auditbridge_api_tail_disconnects_total";

fn describe() {
    describe_counter!(
        EVENTS_RECEIVED,
        Unit::Count,
        "Messages pulled from JetStream."
    );
    describe_counter!(
        EVENTS_PERSISTED,
        Unit::Count,
        "Events newly stored in audit_events."
    );
    describe_counter!(
        EVENTS_DUPLICATE,
        Unit::Count,
        "Events whose id was already stored (redelivery or re-send)."
    );
    describe_counter!(
        EVENTS_DEAD_LETTERED,
        Unit::Count,
        "Messages refused and kept in dead_letters, by kind."
    );
    describe_counter!(
        EVENTS_CONFLICT,
        Unit::Count,
        "Re-sent ids whose content differs from the stored event, kept as conflict dead letters."
    );
    describe_counter!(
        EVENTS_REDACTED,
        Unit::Count,
        "Events whose values the ingest redaction rules redacted before they were stored."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per persisted batch.");
    describe_histogram!(
        BATCH_BYTES,
        Unit::Bytes,
        "Bytes of messages per persisted batch."
    );
    describe_histogram!(
        PERSIST_DURATION,
        Unit::Seconds,
        "Time to write and commit one batch."
    );
    describe_histogram!(
        PUBLISH_TO_COMMIT,
        Unit::Seconds,
        "From JetStream storing a message to the commit that contains it."
    );
    describe_counter!(
        PERSIST_FAILURES,
        Unit::Count,
        "Failed attempts to persist a batch, by reason."
    );
    describe_counter!(
        ACK_FAILURES,
        Unit::Count,
        "Acknowledgements that could not be sent."
    );
    describe_gauge!(
        CONSUMER_PENDING,
        Unit::Count,
        "Messages in the stream not yet delivered to the consumer."
    );
    describe_gauge!(
        CONSUMER_ACK_PENDING,
        Unit::Count,
        "Messages delivered and not yet acknowledged."
    );
    describe_gauge!(DATABASE_UP, "1 when PostgreSQL answered the last check.");
    describe_gauge!(NATS_UP, "1 when the NATS connection is up.");
    describe_destinations();
    describe_log();
    describe_retention();
    describe_api();
    describe_sources();
}

fn describe_api() {
    describe_counter!(
        API_REQUESTS,
        Unit::Count,
        "API requests answered, by route and status code."
    );
    describe_histogram!(
        API_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer an API request, by route."
    );
    describe_gauge!(API_TAIL_CLIENTS, Unit::Count, "Live tails open now.");
    describe_counter!(
        API_TAIL_DISCONNECTS,
        Unit::Count,
        "Live tails the server ended, by reason (slow: the client fell behind)."
    );
}

// Sources (webhooks, HTTP ingest, file tails). Labels are bounded: `source` is a configured
// name, `result` and `reason` are fixed sets.

/// Labels `source`, `result`: accepted | rejected | unauthorized | unavailable | too_large |
/// timeout | busy.
pub const WEBHOOK_REQUESTS: &str = "auditbridge_webhook_requests_total";
/// Labels `source`, `reason`: missing | bad_timestamp | expired | malformed | mismatch.
pub const WEBHOOK_SIGNATURE_FAILURES: &str = "auditbridge_webhook_signature_failures_total";
/// Label `result`: accepted | rejected | forbidden.
pub const INGEST_EVENTS: &str = "auditbridge_ingest_events_total";
/// Labels `source`, `result`: published | rejected.
pub const TAIL_LINES: &str = "auditbridge_tail_lines_total";
/// Label `source`: the persisted byte offset in the current file.
pub const TAIL_OFFSET: &str = "auditbridge_tail_offset_bytes";
/// Label `source`.
pub const TAIL_ROTATIONS: &str = "auditbridge_tail_rotations_total";
/// Label `source`.
pub const TAIL_TRUNCATIONS: &str = "auditbridge_tail_truncations_total";
/// Label `source`: files the tail had not finished that were gone before it could read them
/// (deleted or compressed while it was stopped); their unread lines are lost.
pub const TAIL_FILES_LOST: &str = "auditbridge_tail_files_lost_total";
/// Label `source`: publish attempts that failed and are being retried.
pub const TAIL_PUBLISH_FAILURES: &str = "auditbridge_tail_publish_failures_total";

/// Labels `source`, `outcome`: ok | one of the error kinds of [`POLL_ERRORS`].
pub const POLL_REQUESTS: &str = "auditbridge_poll_requests_total";
/// Label `source`: pages accounted for (their events acknowledged, their rejects kept).
pub const POLL_PAGES: &str = "auditbridge_poll_pages_total";
/// Labels `source`, `result`: published | rejected | seen (already published in a window's
/// overlap).
pub const POLL_EVENTS: &str = "auditbridge_poll_events_total";
/// Labels `source`, `kind`: auth | rate_limited | unavailable | http_5xx | http_4xx | network |
/// timeout | too_large | malformed | foreign_link | oauth | publish | database.
pub const POLL_ERRORS: &str = "auditbridge_poll_errors_total";
/// Label `source`: seconds since the cursor last moved.
pub const POLL_CURSOR_AGE: &str = "auditbridge_poll_cursor_age_seconds";
/// Label `source`: now minus the newest published event's `occurred_at`.
pub const POLL_LAG: &str = "auditbridge_poll_lag_seconds";
/// Label `source`: 1 while this process holds the source's lease.
pub const POLL_LEASE_HELD: &str = "auditbridge_poll_lease_held";

fn describe_sources() {
    describe_counter!(
        POLL_REQUESTS,
        Unit::Count,
        "Requests an api source made, by source and outcome."
    );
    describe_counter!(
        POLL_PAGES,
        Unit::Count,
        "Pages of an api source accounted for (events acknowledged, rejects kept)."
    );
    describe_counter!(
        POLL_EVENTS,
        Unit::Count,
        "Items of an api source's pages, by source and result."
    );
    describe_counter!(
        POLL_ERRORS,
        Unit::Count,
        "Failed polls of an api source, by source and kind."
    );
    describe_gauge!(
        POLL_CURSOR_AGE,
        Unit::Seconds,
        "Seconds since an api source's cursor last moved."
    );
    describe_gauge!(
        POLL_LAG,
        Unit::Seconds,
        "Now minus the occurred_at of the newest event an api source published."
    );
    describe_gauge!(
        POLL_LEASE_HELD,
        "1 while this process holds the api source's lease."
    );
    describe_counter!(
        WEBHOOK_REQUESTS,
        Unit::Count,
        "Webhook requests answered, by source and result."
    );
    describe_counter!(
        WEBHOOK_SIGNATURE_FAILURES,
        Unit::Count,
        "Webhook requests whose signature did not verify, by source and reason."
    );
    describe_counter!(
        INGEST_EVENTS,
        Unit::Count,
        "Events posted to the HTTP ingest endpoint, by result."
    );
    describe_counter!(
        TAIL_LINES,
        Unit::Count,
        "Lines read by a file tail, by source and result."
    );
    describe_gauge!(
        TAIL_OFFSET,
        Unit::Bytes,
        "The persisted byte offset of a file tail in its current file."
    );
    describe_counter!(
        TAIL_ROTATIONS,
        Unit::Count,
        "File rotations a tail followed."
    );
    describe_counter!(
        TAIL_TRUNCATIONS,
        Unit::Count,
        "Truncations of a followed file (read again from the start)."
    );
    describe_counter!(
        TAIL_FILES_LOST,
        Unit::Count,
        "Rotated files that were gone before the tail finished them."
    );
    describe_counter!(
        TAIL_PUBLISH_FAILURES,
        Unit::Count,
        "Publish attempts of a file tail that failed and are retried."
    );
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle. Later calls
/// (several workers in one test process) share it.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let sizes = [
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            ];
            // Powers of 4 from 1 KiB to 256 MiB (the largest AUDITBRIDGE_BATCH_MAX_BYTES).
            let bytes: Vec<f64> = (0..=9).map(|i| 1024.0 * 4f64.powi(i)).collect();
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_messages".into()), &sizes))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_BYTES.into()), &bytes))
                .expect("bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); metrics then go
            // there and /metrics shows only what this handle sees.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Keeps the recorder's histograms drained; run once per process.
pub async fn upkeep(handle: PrometheusHandle) -> std::convert::Infallible {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Sets up `tracing` for a command: filter from `AUDITBRIDGE_LOG`, text (coloured only on a
/// terminal) or JSON lines on stderr. An invalid filter is an error naming the variable.
/// Safe to call twice (the second call does nothing).
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    use std::io::IsTerminal as _;
    // The NATS client logs every (re)connection at info; our own event callback already
    // reports those once, so it is quieted unless the filter names it.
    let full = if filter.contains("async_nats") {
        filter.to_owned()
    } else {
        format!("{filter},async_nats=warn")
    };
    let parsed = tracing_subscriber::EnvFilter::try_new(&full).map_err(|e| {
        format!("invalid setting AUDITBRIDGE_LOG={filter:?}: expected a tracing filter such as \"info\" or \"auditbridge_worker=debug,info\" ({e})")
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(parsed)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    Ok(())
}

// Per destination; label `destination` (configured names: few, low cardinality).
pub const DEST_DELIVERED: &str = "auditbridge_destination_delivered_total";
/// Label `reason` too: connect | timeout | status_5xx | status_429 | status_4xx | nack | ...
pub const DEST_FAILURES: &str = "auditbridge_destination_failures_total";
pub const DEST_SKIPPED: &str = "auditbridge_destination_skipped_total";
/// Label `reason` too: routing_key | returned | status_4xx | status_3xx | ...
pub const DEST_DEAD_LETTERED: &str = "auditbridge_destination_dead_lettered_total";
/// Label `outcome` too: delivered | refused.
pub const DEST_REDELIVERED: &str = "auditbridge_destination_redeliveries_total";
pub const DEST_BACKLOG_EVENTS: &str = "auditbridge_destination_backlog_events";
pub const DEST_BACKLOG_SECONDS: &str = "auditbridge_destination_backlog_age_seconds";
pub const DEST_UP: &str = "auditbridge_destination_up";
pub const DEST_LEASE_HELD: &str = "auditbridge_destination_lease_held";
pub const DEST_LATENCY: &str = "auditbridge_destination_delivery_latency_seconds";

// The verifiable log's sequencer (on the worker holding the `_log` lease).
pub const LOG_LEAVES: &str = "auditbridge_log_leaves_total";
pub const LOG_UNSEQUENCED: &str = "auditbridge_log_unsequenced_events";
pub const LOG_LAG_SECONDS: &str = "auditbridge_log_sequencer_lag_seconds";
pub const LOG_CHECKPOINTS_SIGNED: &str = "auditbridge_log_checkpoints_signed_total";
/// The oldest of the tenants' newest checkpoints: how stale the freshest proof can be.
pub const LOG_CHECKPOINT_AGE: &str = "auditbridge_log_checkpoint_age_seconds";
pub const LOG_LEASE_HELD: &str = "auditbridge_log_sequencer_lease_held";
/// Label `reason`: database | lease.
pub const LOG_FAILURES: &str = "auditbridge_log_sequencer_failures_total";
/// Label `destination`: checkpoints delivered to a destination with `"checkpoints": true`.
pub const LOG_CHECKPOINTS_FORWARDED: &str = "auditbridge_log_checkpoints_forwarded_total";
/// Label `destination`, `reason`: failed checkpoint deliveries (each is retried).
pub const LOG_CHECKPOINT_FAILURES: &str = "auditbridge_log_checkpoint_delivery_failures_total";

// Retention (issue 12): counters on the worker (or `retention run`) that expires; gauges on
// the holder of the `_retention` lease, set after each run.
pub const RETENTION_PARTITIONS_DROPPED: &str = "auditbridge_retention_partitions_dropped_total";
pub const RETENTION_EVENTS_EXPIRED: &str = "auditbridge_retention_events_expired_total";
pub const RETENTION_RECEIPTS: &str = "auditbridge_retention_receipts_total";
pub const RETENTION_DEAD_LETTERS_EXPIRED: &str = "auditbridge_retention_dead_letters_expired_total";
pub const RETENTION_PARTITIONS_KEPT: &str = "auditbridge_retention_partitions_kept_total";
pub const RETENTION_FAILURES: &str = "auditbridge_retention_failures_total";
pub const PARTITIONS_CREATED: &str = "auditbridge_partitions_created_total";
pub const RETENTION_PARTITIONS: &str = "auditbridge_retention_partitions";
pub const RETENTION_BYTES: &str = "auditbridge_retention_bytes";
pub const RETENTION_HOLDS: &str = "auditbridge_retention_holds_in_force";
/// Seconds until the next partition is droppable (negative: overdue, e.g. held).
pub const RETENTION_NEXT_EXPIRY: &str = "auditbridge_retention_next_expiry_seconds";
/// Age of the start of the oldest partition (the oldest stored event is at most this old).
pub const RETENTION_OLDEST_AGE: &str = "auditbridge_retention_oldest_partition_age_seconds";

fn describe_retention() {
    describe_counter!(
        RETENTION_PARTITIONS_DROPPED,
        Unit::Count,
        "Partitions of audit_events that expiry dropped (with events in them)."
    );
    describe_counter!(
        RETENTION_EVENTS_EXPIRED,
        Unit::Count,
        "Events that left the trail by expiry, each under a signed receipt."
    );
    describe_counter!(
        RETENTION_RECEIPTS,
        Unit::Count,
        "Retention receipts stored (one per tenant and dropped partition)."
    );
    describe_counter!(
        RETENTION_DEAD_LETTERS_EXPIRED,
        Unit::Count,
        "Dead letters deleted after AUDITBRIDGE_DEAD_LETTER_RETENTION."
    );
    describe_counter!(
        RETENTION_PARTITIONS_KEPT,
        Unit::Count,
        "Partitions past their end that an expiry run kept (not yet due, held, busy)."
    );
    describe_counter!(
        RETENTION_FAILURES,
        Unit::Count,
        "Expiry runs that failed (retried at the next run)."
    );
    describe_counter!(
        PARTITIONS_CREATED,
        Unit::Count,
        "Partitions of audit_events created ahead of need."
    );
    describe_gauge!(
        RETENTION_PARTITIONS,
        Unit::Count,
        "Partitions of audit_events."
    );
    describe_gauge!(
        RETENTION_BYTES,
        Unit::Bytes,
        "Bytes of audit_events' partitions on disk, with their indexes."
    );
    describe_gauge!(RETENTION_HOLDS, Unit::Count, "Legal holds in force.");
    describe_gauge!(
        RETENTION_NEXT_EXPIRY,
        Unit::Seconds,
        "Seconds until the next partition becomes droppable (negative: overdue, e.g. held)."
    );
    describe_gauge!(
        RETENTION_OLDEST_AGE,
        Unit::Seconds,
        "Age of the start of the oldest partition of audit_events."
    );
}

fn describe_log() {
    describe_counter!(
        LOG_LEAVES,
        Unit::Count,
        "Events appended to their tenant's verifiable log."
    );
    describe_gauge!(
        LOG_UNSEQUENCED,
        Unit::Count,
        "Stored events not yet in their tenant's log."
    );
    describe_gauge!(
        LOG_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest stored event not yet in its tenant's log."
    );
    describe_counter!(
        LOG_CHECKPOINTS_SIGNED,
        Unit::Count,
        "Checkpoints signed with AUDITBRIDGE_LOG_KEY_FILE's key."
    );
    describe_gauge!(
        LOG_CHECKPOINT_AGE,
        Unit::Seconds,
        "Age of the oldest of the tenants' newest checkpoints."
    );
    describe_gauge!(LOG_LEASE_HELD, "1 on the worker that sequences the logs.");
    describe_counter!(
        LOG_FAILURES,
        Unit::Count,
        "Sequencer steps that failed, by reason (the batch is retried)."
    );
    describe_counter!(
        LOG_CHECKPOINTS_FORWARDED,
        Unit::Count,
        "Checkpoints delivered to a destination with \"checkpoints\": true."
    );
    describe_counter!(
        LOG_CHECKPOINT_FAILURES,
        Unit::Count,
        "Failed checkpoint deliveries, by destination and reason (each is retried)."
    );
}

fn describe_destinations() {
    describe_counter!(
        DEST_DELIVERED,
        Unit::Count,
        "Events confirmed by the destination."
    );
    describe_counter!(
        DEST_FAILURES,
        Unit::Count,
        "Failed delivery attempts, by reason."
    );
    describe_counter!(
        DEST_SKIPPED,
        Unit::Count,
        "Events skipped because they were older than max_backlog_age."
    );
    describe_counter!(
        DEST_DEAD_LETTERED,
        Unit::Count,
        "Events the destination cannot take, kept in destination_dead_letters (on_undeliverable = dead_letter), by reason."
    );
    describe_counter!(
        DEST_REDELIVERED,
        Unit::Count,
        "Dead letters of the destination offered again (destinations redeliver), by outcome."
    );
    describe_gauge!(
        DEST_BACKLOG_EVENTS,
        Unit::Count,
        "Stored events after the destination's cursor (before its filter)."
    );
    describe_gauge!(
        DEST_BACKLOG_SECONDS,
        Unit::Seconds,
        "Age of the oldest stored event the destination has not confirmed."
    );
    describe_gauge!(DEST_UP, "1 when the last delivery attempt succeeded.");
    describe_gauge!(
        DEST_LEASE_HELD,
        "1 on the worker that relays the destination."
    );
    describe_histogram!(
        DEST_LATENCY,
        Unit::Seconds,
        "From the event's commit to the destination's confirmation."
    );
}
