//! The sequencer: appends every stored event, exactly once, to its tenant's verifiable log, in
//! the outbox's commit-safe order, and signs the tenants' checkpoints.
//!
//! Every worker runs one supervisor; only the holder of the `_log` lease sequences (the
//! relays' lease machinery: renewed while it works, taken over within a TTL when the holder
//! dies). The holder keeps each tenant's [`Frontier`] in memory, appends a batch's leaves
//! and the subtrees they complete, and moves the cursor, in one transaction fenced by the
//! lease and by the cursor it read from ([`Store::append_log`]). A failed or fenced append
//! leaves the memory as it was before the batch (the batch is computed on copies), and a lost
//! lease drops everything: the next holder loads the frontiers from the stored log.
//!
//! Checkpoints: every `AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL`, each tenant whose tree grew gets
//! a new one, and every tenant's is signed again at least every [`RESIGN_AFTER`], so that a
//! verifier can tell how fresh the newest is from its timestamped signature.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use auditbridge_store::log::{LOG_CURSOR, LogLeaf, LogNode, StoredCheckpoint};
use auditbridge_store::{Position, Store, StoreError};
use auditbridge_tlog::stored::{stored_range, subtree_hash};
use auditbridge_tlog::{Checkpoint, Frontier, SignerKey};
use metrics::{counter, gauge};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use auditbridge_runtime::telemetry::{
    LOG_CHECKPOINT_AGE, LOG_CHECKPOINTS_SIGNED, LOG_FAILURES, LOG_LAG_SECONDS, LOG_LEASE_HELD,
    LOG_LEAVES, LOG_UNSEQUENCED,
};

/// Most events read and appended in one transaction.
const BATCH: usize = 5_000;
/// How long a caught-up sequencer waits before reading the outbox again.
const POLL: Duration = Duration::from_millis(200);
/// An idle tenant's checkpoint is signed again after this long.
pub(crate) const RESIGN_AFTER: Duration = Duration::from_secs(60);
/// The origin's log name when no key names the log.
pub(crate) const UNSIGNED_LOG_NAME: &str = "auditbridge";

/// What the sequencer needs.
pub(crate) struct Sequencer {
    pub store: Store,
    pub holder: String,
    pub lease_ttl: Duration,
    pub key: Option<SignerKey>,
    pub checkpoint_interval: Duration,
}

impl Sequencer {
    fn log_name(&self) -> &str {
        self.key.as_ref().map_or(UNSIGNED_LOG_NAME, SignerKey::name)
    }
}

/// Registers the `_log` row, then competes for its lease and sequences while holding it,
/// until shutdown.
pub(crate) async fn supervise(seq: Sequencer, shutdown: CancellationToken) {
    let span = tracing::info_span!("sequencer");
    supervise_inner(seq, shutdown).instrument(span).await;
}

async fn supervise_inner(seq: Sequencer, shutdown: CancellationToken) {
    let mut lease = crate::lease::Lease::new(&seq.store, LOG_CURSOR, &seq.holder, seq.lease_ttl);
    while let Some(held) = lease.acquire(&shutdown, || seq.store.register_log()).await {
        tracing::info!(cursor = ?held.state.cursor, signed = seq.key.is_some(), message = "Took the log's lease; sequencing.");
        gauge!(LOG_LEASE_HELD).set(1.0);
        let mut state = Held {
            seq: &seq,
            cursor: held.state.cursor.clone(),
            trees: HashMap::new(),
            checkpointed: HashMap::new(),
            held: held.token.clone(),
        };
        state.run().await;
        gauge!(LOG_LEASE_HELD).set(0.0);
        lease.finish(held, &shutdown).await;
    }
}

/// The holder's state: every tenant's tree it has loaded, and when each was last
/// checkpointed.
struct Held<'s> {
    seq: &'s Sequencer,
    cursor: Position,
    trees: HashMap<String, Frontier>,
    /// Tenant → (size, when) of its newest checkpoint.
    checkpointed: HashMap<String, (u64, Instant)>,
    held: CancellationToken,
}

impl Held<'_> {
    async fn run(&mut self) {
        if !self.load_checkpointed().await {
            return;
        }
        let mut next_checkpoints = Instant::now();
        let mut next_report = Instant::now();
        let mut failures = 0u32;
        let mut backoff = auditbridge_runtime::retry_backoff();
        while !self.held.is_cancelled() {
            let mut caught_up = false;
            match self.step().await {
                Ok(Some(0)) => caught_up = true,
                Ok(Some(_)) => {
                    failures = 0;
                    backoff = auditbridge_runtime::retry_backoff();
                }
                // Fenced: the lease or the cursor is someone else's now.
                Ok(None) => {
                    counter!(LOG_FAILURES, "reason" => "lease").increment(1);
                    tracing::warn!(
                        message = "The log's lease or cursor moved under the sequencer; stopping."
                    );
                    return;
                }
                Err(e) => {
                    failures += 1;
                    counter!(LOG_FAILURES, "reason" => "database").increment(1);
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, attempts = failures, message = "Cannot append to the log now; retrying.");
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    if !self.pause(delay).await {
                        return;
                    }
                    continue;
                }
            }
            if Instant::now() >= next_checkpoints {
                match self.checkpoint_all().await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        let message = "Cannot store checkpoints now; retrying.";
                        tracing::warn!(error = %e, message);
                    }
                }
                next_checkpoints = Instant::now() + self.seq.checkpoint_interval;
            }
            if Instant::now() >= next_report {
                self.report().await;
                next_report = Instant::now() + Duration::from_secs(5);
            }
            if caught_up && !self.pause(POLL).await {
                return;
            }
        }
    }

    /// Sleeps unless the lease goes first; false if it did.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.held.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// The newest checkpoint of every tenant: the sizes already checkpointed, and when.
    async fn load_checkpointed(&mut self) -> bool {
        loop {
            match self.seq.store.newest_checkpoints().await {
                Ok(list) => {
                    let now_db = OffsetDateTime::now_utc();
                    for c in list {
                        let age = (now_db - c.signed_at).unsigned_abs();
                        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                        self.checkpointed.insert(c.tenant, (c.tree_size, at));
                    }
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, message = "Cannot read the checkpoints yet; retrying.");
                    if !self.pause(Duration::from_secs(1)).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Reads one batch after the cursor and appends it. `Some(n)`: `n` events appended;
    /// `None`: fenced.
    async fn step(&mut self) -> Result<Option<usize>, StoreError> {
        let rows = self.seq.store.read_for_log(&self.cursor, BATCH).await?;
        let Some(last) = rows.last() else {
            return Ok(Some(0));
        };
        let to = last.position.clone();
        // The batch is computed on copies: memory changes only when the append commits.
        let mut work: HashMap<String, Frontier> = HashMap::new();
        let mut leaves = Vec::with_capacity(rows.len());
        let mut nodes = Vec::new();
        for event in &rows {
            if !work.contains_key(&event.tenant) {
                let tree = match self.trees.get(&event.tenant) {
                    Some(t) => t.clone(),
                    None => load_frontier(&self.seq.store, &event.tenant).await?,
                };
                work.insert(event.tenant.clone(), tree);
            }
            let tree = work.get_mut(&event.tenant).expect("inserted above");
            leaves.push(LogLeaf {
                tenant: event.tenant.clone(),
                index: tree.size(),
                event_id: event.event_id,
                hash: event.leaf,
            });
            for (subtree, hash) in tree.push(event.leaf) {
                nodes.push(LogNode {
                    tenant: event.tenant.clone(),
                    level: subtree.height / auditbridge_tlog::stored::TILE_HEIGHT,
                    index: subtree.index,
                    hash,
                });
            }
        }
        let appended = self
            .seq
            .store
            .append_log(&self.seq.holder, &self.cursor, &to, &leaves, &nodes)
            .await?;
        if !appended {
            return Ok(None);
        }
        self.trees.extend(work);
        self.cursor = to;
        counter!(LOG_LEAVES).increment(leaves.len() as u64);
        Ok(Some(leaves.len()))
    }

    /// Checkpoints every tenant whose tree grew, and re-signs those whose newest is older
    /// than [`RESIGN_AFTER`]. False: the lease was lost.
    async fn checkpoint_all(&mut self) -> Result<bool, StoreError> {
        // Tenants checkpointed before but not loaded since this holder started.
        let idle: Vec<String> = self
            .checkpointed
            .keys()
            .filter(|t| !self.trees.contains_key(*t))
            .cloned()
            .collect();
        for tenant in idle {
            let tree = load_frontier(&self.seq.store, &tenant).await?;
            self.trees.insert(tenant, tree);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut oldest = Duration::ZERO;
        for (tenant, tree) in &self.trees {
            let due = match self.checkpointed.get(tenant) {
                None => true,
                Some((size, at)) => *size != tree.size() || at.elapsed() >= RESIGN_AFTER,
            };
            if !due {
                if let Some((_, at)) = self.checkpointed.get(tenant) {
                    oldest = oldest.max(at.elapsed());
                }
                continue;
            }
            let checkpoint = Checkpoint {
                origin: format!("{}/{tenant}", self.seq.log_name()),
                size: tree.size(),
                root: tree.root(),
            };
            let (note, signed) = match &self.seq.key {
                Some(key) => (checkpoint.sign(key, now), true),
                None => (checkpoint.text(), false),
            };
            let stored = StoredCheckpoint {
                tenant: tenant.clone(),
                tree_size: checkpoint.size,
                root: checkpoint.root,
                signed_at: OffsetDateTime::from_unix_timestamp(now as i64)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                signed,
                note,
            };
            if !self
                .seq
                .store
                .insert_checkpoint(&self.seq.holder, &stored)
                .await?
            {
                return Ok(false);
            }
            if signed {
                counter!(LOG_CHECKPOINTS_SIGNED).increment(1);
            }
            self.checkpointed
                .insert(tenant.clone(), (checkpoint.size, Instant::now()));
        }
        gauge!(LOG_CHECKPOINT_AGE).set(oldest.as_secs_f64());
        Ok(true)
    }

    /// Publishes the unsequenced count and the lag.
    async fn report(&self) {
        if let Ok(b) = self.seq.store.backlog(&self.cursor).await
            && let Ok(now) = self.seq.store.now().await
        {
            gauge!(LOG_UNSEQUENCED).set(b.events as f64);
            let age = b
                .oldest
                .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
            gauge!(LOG_LAG_SECONDS).set(age);
        }
    }
}

/// A tenant's tree as stored: its size, and the hashes of the complete subtrees its leaves
/// are made of, each computed from the stored nodes of its range.
pub(crate) async fn load_frontier(store: &Store, tenant: &str) -> Result<Frontier, StoreError> {
    let size = store.log_size(tenant).await?;
    let parts = Frontier::parts(size);
    let ranges: Vec<_> = parts.iter().map(|s| stored_range(*s)).collect();
    let stored = store.log_stored(tenant, &ranges).await?;
    let mut hashes = Vec::with_capacity(parts.len());
    for (range, got) in ranges.iter().zip(&stored) {
        if got.len() as u64 != range.count {
            return Err(StoreError::Corrupt(format!(
                "tenant {tenant}'s log of {size} leaves lacks stored nodes of level {} from {} \
                 ({} of {})",
                range.level,
                range.first,
                got.len(),
                range.count
            )));
        }
        hashes.push(subtree_hash(got));
    }
    Frontier::from_parts(size, hashes)
        .ok_or_else(|| StoreError::Corrupt(format!("tenant {tenant}'s log frontier")))
}
