//! Retention in the worker (ARCHITECTURE.md, "Retention"): every worker keeps the partitions
//! of `audit_events` created ahead of need, and reads the policies again, so that a row never
//! waits for a partition and a changed policy reaches every writer within seconds; the one
//! holding the `_retention` lease expires what is due ([`expire`], also run by `auditbridge
//! retention run`).

use std::time::Duration;

use auditbridge_config::Config;
use auditbridge_runtime::telemetry::{
    PARTITIONS_CREATED, RETENTION_BYTES, RETENTION_DEAD_LETTERS_EXPIRED, RETENTION_EVENTS_EXPIRED,
    RETENTION_FAILURES, RETENTION_HOLDS, RETENTION_NEXT_EXPIRY, RETENTION_OLDEST_AGE,
    RETENTION_PARTITIONS, RETENTION_PARTITIONS_DROPPED, RETENTION_PARTITIONS_KEPT,
    RETENTION_RECEIPTS,
};
use auditbridge_store::retention::{Candidate, PendingTenant, Receipt, ranges_text};
use auditbridge_store::{RetentionPolicy, Store, StoreError};
use auditbridge_tlog::SignerKey;
use base64::Engine as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

/// The lease (a row of `destinations`) whose holder runs expiry on a schedule.
pub const RETENTION_LEASE: &str = "_retention";
/// How long expiry asks for a partition's lock at a time, and how often: ingest waits behind
/// the request at most this long each time (the benchmark's longest stall).
const LOCK_WAIT: Duration = Duration::from_millis(50);
const LOCK_ATTEMPTS: u32 = 8;
/// Dead letters deleted per statement.
const DEAD_LETTER_BATCH: i32 = 10_000;

/// The policies the configuration asks for, as `migrate` stores them.
pub fn policy_of(config: &Config) -> RetentionPolicy {
    let mut tenants: Vec<(String, Option<Duration>)> = config
        .retention
        .tenants
        .iter()
        .map(|t| (t.tenant.clone(), t.keep))
        .collect();
    // In the order the store reads them back.
    tenants.sort();
    RetentionPolicy {
        partition_interval: config.partition_interval,
        default_keep: config.retention.default,
        tenants,
        dead_letter_keep: config.dead_letter_retention,
    }
}

/// How often a worker makes sure the partitions exist: a quarter of the interval, between a
/// second and a minute (partitions are made three intervals ahead).
fn maintenance_period(interval: Duration) -> Duration {
    (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Creates missing partitions and re-reads the policies until `shutdown`. Warns once when the
/// configuration's policy is not the one stored (`migrate` writes it; until then the stored
/// one applies).
pub(crate) async fn maintain(store: Store, config: RetentionPolicy, shutdown: CancellationToken) {
    let mut warned = false;
    let mut period = maintenance_period(config.partition_interval);
    loop {
        match store.retention_policy().await {
            Ok(stored) => {
                period = maintenance_period(stored.partition_interval);
                if stored != config && !warned {
                    warned = true;
                    tracing::warn!(
                        stored = ?stored,
                        configured = ?config,
                        message = "The retention policy in this worker's configuration differs from the one stored in the database, which applies; run `auditbridge migrate` with this configuration to store it."
                    );
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, message = "Cannot read the retention policy now.");
            }
        }
        if let Err(e) = store.refresh_retention().await {
            tracing::debug!(error = %e, message = "Cannot read the retention classes now.");
        }
        match store.ensure_partitions().await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!(PARTITIONS_CREATED).increment(n as u64);
                tracing::info!(
                    created = n,
                    message = "Created partitions of audit_events ahead of need."
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, message = "Cannot create the partitions of audit_events ahead of need now; rows that find none create them when they arrive.");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// What one expiry run did, partition by partition.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub partitions: Vec<PartitionReport>,
    /// Partitions dropped that held events, and the events in them.
    pub dropped: usize,
    pub events: i64,
    /// Empty partitions dropped (not listed in `partitions`).
    pub empty_dropped: usize,
    /// Dead letters deleted.
    pub dead_letters: i64,
}

#[derive(Debug, Clone)]
pub struct PartitionReport {
    pub partition: String,
    /// What the run counted per tenant (when it got as far as counting).
    pub counted: Vec<PendingTenant>,
    /// Each tenant in it, its retention in seconds (`None`: forever), and whether it is due.
    pub tenants: Vec<(String, Option<i64>, bool)>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Dropped,
    /// A dry run: it would have been dropped.
    WouldGo,
    /// Kept, and why.
    Kept(String),
}

fn keep_text(keep: Option<i64>) -> String {
    keep.map_or_else(|| "forever".to_owned(), |s| format!("{s}s"))
}

fn time_text(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".to_owned())
}

/// Why a candidate is not due as a whole: the tenants whose rows are not past their
/// retention.
fn not_due(c: &Candidate) -> Option<String> {
    let waiting: Vec<String> = c
        .tenants
        .iter()
        .filter(|(_, _, due)| !due)
        .map(|(t, keep, _)| match keep {
            None => format!("tenant {t} keeps forever"),
            Some(s) => format!("tenant {t} keeps {s}s"),
        })
        .collect();
    (!waiting.is_empty()).then(|| waiting.join(", "))
}

/// The text of one tenant's receipt (a C2SP signed-note body): what left, under which
/// policy, and the tenant's log at the cut.
pub fn receipt_text(
    log_name: &str,
    partition: &str,
    t: &PendingTenant,
    checkpoint: Option<&(i64, Vec<u8>)>,
    now: OffsetDateTime,
) -> String {
    let undelivered = if t.undelivered.is_empty() {
        "none".to_owned()
    } else {
        t.undelivered
            .iter()
            .map(|(d, n)| format!("{d}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let checkpoint = match checkpoint {
        Some((size, root)) => format!(
            "{size} {}",
            base64::engine::general_purpose::STANDARD.encode(root)
        ),
        None => "none".to_owned(),
    };
    format!(
        "{log_name}/{tenant}\n\
         auditbridge retention receipt v1\n\
         partition {partition}\n\
         expired {expired}\n\
         policy keep {keep}\n\
         holds none\n\
         events {events}\n\
         indexes {indexes}\n\
         received {r0} {r1}\n\
         occurred {o0} {o1}\n\
         unlogged {unlogged}\n\
         undelivered {undelivered}\n\
         checkpoint {checkpoint}\n",
        tenant = t.tenant,
        expired = time_text(Some(now)),
        keep = keep_text(t.keep_s),
        events = t.events,
        indexes = ranges_text(&t.log_indexes),
        r0 = time_text(t.first_received),
        r1 = time_text(t.last_received),
        o0 = time_text(t.first_occurred),
        o1 = time_text(t.last_occurred),
        unlogged = t.unlogged,
    )
}

/// Expires every partition that is due and not held, oldest first, one transaction each (see
/// migration 0009), signing each tenant's receipt with `key`; then the dead letters past
/// their retention. With `dry_run`, counts and reports and changes nothing. Stops between
/// partitions when `stop` is cancelled.
pub async fn expire(
    store: &Store,
    key: Option<&SignerKey>,
    dry_run: bool,
    stop: &CancellationToken,
) -> Result<Report, StoreError> {
    let log_name = key.map_or(crate::sequencer::UNSIGNED_LOG_NAME, SignerKey::name);
    let mut report = Report::default();
    for c in store.expiry_candidates().await? {
        if stop.is_cancelled() {
            break;
        }
        let empty = c.tenants.is_empty();
        if empty && !c.settled {
            // Rows may still arrive in it.
            continue;
        }
        let mut line = PartitionReport {
            partition: c.partition.name.clone(),
            counted: Vec::new(),
            tenants: c.tenants.clone(),
            outcome: Outcome::Kept(String::new()),
        };
        if let Some(why) = not_due(&c) {
            line.outcome = Outcome::Kept(why);
            report.partitions.push(line);
            continue;
        }
        let mut expiry = match store.begin_expiry(&c.partition).await {
            Ok(e) => e,
            Err(e) if e.is_lock_timeout() => {
                line.outcome = Outcome::Kept(format!("busy (its locks were not granted): {e}"));
                report.partitions.push(line);
                continue;
            }
            Err(e) if e.is_retryable() => return Err(e),
            // Dropped by another run since it was listed.
            Err(e) if e.sqlstate().as_deref() == Some("42P01") => continue,
            // Dropped by another run meanwhile, say.
            Err(e) => {
                line.outcome = Outcome::Kept(format!("refused: {e}"));
                report.partitions.push(line);
                continue;
            }
        };
        line.counted = expiry.tenants.clone();
        let mut reasons: Vec<String> = Vec::new();
        for t in &expiry.tenants {
            if !t.held_by.is_empty() {
                let ids: Vec<String> = t.held_by.iter().map(|h| format!("#{h}")).collect();
                reasons.push(format!("tenant {} held by {}", t.tenant, ids.join(", ")));
            } else if !t.due {
                reasons.push(format!("tenant {} keeps {}", t.tenant, keep_text(t.keep_s)));
            }
        }
        if !reasons.is_empty() || dry_run {
            expiry.abandon().await?;
            if empty {
                continue;
            }
            line.outcome = if reasons.is_empty() {
                Outcome::WouldGo
            } else {
                Outcome::Kept(reasons.join(", "))
            };
            report.partitions.push(line);
            continue;
        }
        let now = OffsetDateTime::now_utc();
        let mut receipts = Vec::with_capacity(expiry.tenants.len());
        for t in expiry.tenants.clone() {
            let checkpoint = expiry.checkpoint(&t.tenant).await?;
            let text = receipt_text(log_name, &c.partition.name, &t, checkpoint.as_ref(), now);
            let note = match key {
                Some(k) => auditbridge_tlog::sign_note(&text, k),
                None => text,
            };
            receipts.push(Receipt {
                tenant: t.tenant.clone(),
                note,
                tree_size: checkpoint.as_ref().map(|c| c.0),
                root: checkpoint.map(|c| c.1),
            });
        }
        match expiry
            .commit(&receipts, key.is_some(), LOCK_WAIT, LOCK_ATTEMPTS)
            .await
        {
            Ok(events) => {
                for t in &line.counted {
                    if t.unlogged > 0 || !t.undelivered.is_empty() {
                        tracing::error!(
                            partition = %c.partition.name,
                            tenant = %t.tenant,
                            unlogged = t.unlogged,
                            undelivered = ?t.undelivered,
                            message = "Expired events that were not yet in the signed log or not yet delivered to every destination; the receipt counts them."
                        );
                    }
                }
                if !empty {
                    tracing::info!(partition = %c.partition.name, events, tenants = receipts.len(), message = "Expired a partition of audit_events; receipts signed.");
                }
                metrics::counter!(RETENTION_PARTITIONS_DROPPED).increment(1);
                metrics::counter!(RETENTION_EVENTS_EXPIRED)
                    .increment(u64::try_from(events).unwrap_or(0));
                metrics::counter!(RETENTION_RECEIPTS).increment(receipts.len() as u64);
                if empty {
                    report.empty_dropped += 1;
                    continue;
                }
                report.dropped += 1;
                report.events += events;
                line.outcome = Outcome::Dropped;
            }
            Err(e) if e.is_lock_timeout() => {
                line.outcome = Outcome::Kept(format!(
                    "busy: its lock was not granted within {LOCK_ATTEMPTS} tries of {LOCK_WAIT:?}"
                ));
            }
            Err(e) => {
                tracing::warn!(partition = %c.partition.name, error = %e, message = "Expiry refused to drop a partition.");
                line.outcome = Outcome::Kept(format!("refused: {e}"));
            }
        }
        report.partitions.push(line);
    }
    if !dry_run {
        loop {
            if stop.is_cancelled() {
                break;
            }
            let n = store.expire_dead_letters(DEAD_LETTER_BATCH).await?;
            report.dead_letters += n;
            metrics::counter!(RETENTION_DEAD_LETTERS_EXPIRED)
                .increment(u64::try_from(n).unwrap_or(0));
            if n < i64::from(DEAD_LETTER_BATCH) {
                break;
            }
        }
    }
    for p in &report.partitions {
        if let Outcome::Kept(why) = &p.outcome {
            metrics::counter!(RETENTION_PARTITIONS_KEPT).increment(1);
            tracing::debug!(partition = %p.partition, why = %why, message = "Kept a partition past its end.");
        }
    }
    Ok(report)
}

/// Sets the retention gauges from [`Store::retention_status`].
async fn report_gauges(store: &Store) {
    let status = match store.retention_status().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, message = "Cannot read the retention status now.");
            return;
        }
    };
    let now = OffsetDateTime::now_utc();
    metrics::gauge!(RETENTION_PARTITIONS).set(status.partitions.len() as f64);
    metrics::gauge!(RETENTION_BYTES).set(
        status
            .partitions
            .iter()
            .map(|p| p.bytes as f64)
            .sum::<f64>(),
    );
    metrics::gauge!(RETENTION_HOLDS).set(status.holds_in_force as f64);
    match status.next_expiry() {
        Some(t) => metrics::gauge!(RETENTION_NEXT_EXPIRY).set((t - now).as_seconds_f64()),
        None => metrics::gauge!(RETENTION_NEXT_EXPIRY).set(f64::NAN),
    }
    let oldest = status
        .partitions
        .iter()
        .filter(|p| p.tenants > 0)
        .map(|p| p.partition.lower_at.unwrap_or(p.partition.created_at))
        .min();
    if let Some(t) = oldest {
        metrics::gauge!(RETENTION_OLDEST_AGE).set((now - t).as_seconds_f64().max(0.0));
    }
}

/// How often the lease holder runs expiry: a quarter of the interval, between a second and
/// five minutes.
fn expiry_period(interval: Duration) -> Duration {
    (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// Competes for the `_retention` lease; while holding it, expires what is due every
/// [`expiry_period`] of the stored interval, until shutdown.
pub(crate) async fn supervise(
    store: Store,
    key: Option<SignerKey>,
    holder: String,
    lease_ttl: Duration,
    shutdown: CancellationToken,
) {
    let mut lease = crate::lease::Lease::new(&store, RETENTION_LEASE, &holder, lease_ttl);
    while let Some(held) = lease
        .acquire(&shutdown, || {
            store.register_destination(
                RETENTION_LEASE,
                "retention",
                &auditbridge_store::StartAt::Earliest,
            )
        })
        .await
    {
        tracing::info!(message = "Took the retention lease; expiring what is due on schedule.");
        while !held.token.is_cancelled() {
            match expire(&store, key.as_ref(), false, &held.token).await {
                Ok(r) if r.dropped > 0 || r.dead_letters > 0 => {
                    tracing::info!(
                        partitions = r.dropped,
                        events = r.events,
                        dead_letters = r.dead_letters,
                        message = "Expiry run done."
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!(RETENTION_FAILURES).increment(1);
                    tracing::warn!(error = %e, message = "Expiry run failed; trying again at the next one.");
                }
            }
            report_gauges(&store).await;
            let period = match store.retention_policy().await {
                Ok(p) => expiry_period(p.partition_interval),
                Err(_) => Duration::from_secs(60),
            };
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = held.token.cancelled() => {}
            }
        }
        lease.finish(held, &shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_names_what_left_and_the_log_at_the_cut() {
        let t = PendingTenant {
            tenant: "acme".into(),
            keep_s: Some(30),
            due: true,
            held_by: vec![],
            events: 7,
            log_indexes: vec![(0, 5), (9, 11)],
            first_received: Some(OffsetDateTime::UNIX_EPOCH),
            last_received: Some(OffsetDateTime::UNIX_EPOCH),
            first_occurred: None,
            last_occurred: None,
            unlogged: 0,
            undelivered: vec![("siem".into(), 2)],
        };
        let text = receipt_text(
            "audit.example/log",
            "audit_events_c30_19700101t000000",
            &t,
            Some(&(11, vec![0; 32])),
            OffsetDateTime::UNIX_EPOCH,
        );
        assert!(text.starts_with("audit.example/log/acme\nauditbridge retention receipt v1\n"));
        assert!(text.contains("\npolicy keep 30s\n"), "{text}");
        assert!(text.contains("\nindexes 0-4,9-10\n"), "{text}");
        assert!(text.contains("\nundelivered siem=2\n"), "{text}");
        assert!(
            text.ends_with("checkpoint 11 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"),
            "{text}"
        );
        assert!(!text.contains("\n\n"));
    }

    #[test]
    fn maintenance_runs_four_times_an_interval_within_bounds() {
        assert_eq!(
            maintenance_period(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(
            maintenance_period(Duration::from_secs(8)),
            Duration::from_secs(2)
        );
        assert_eq!(
            maintenance_period(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
