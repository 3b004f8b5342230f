//! `auditbridge bench --only log`: the verifiable log over a large trail, next to the raw
//! limits of the same run.
//!
//! 1. Load: N events (`--log-events`, default 5,000,000) of `--log-tenants` tenants (default
//!    1: one tree of N leaves, the deepest proofs) through the store's writer, with no worker
//!    running; the load's write rate is the raw limit for what follows.
//! 2. Catch-up: one worker starts with a signing key and sequences the whole backlog; its rate
//!    (events appended per second until the last is in a log, and its checkpoint signed).
//! 3. Storage: the log's tables per event, next to `audit_events`' own.
//! 4. Proofs: `GET /v1/events/{id}/proof` for random events of the largest log, sequentially
//!    over HTTP (p50, p99), next to the same lookups straight on the store (no HTTP, no JSON).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use auditbridge_config::Scope;
use auditbridge_store::Store;
use auditbridge_tlog::tree::inclusion_ranges;

use crate::{Bench, BenchApi, STOP_GRACE, latencies, spawn_worker};

/// Proofs per latency figure.
const SAMPLES: usize = 1_000;

/// Waits until `n` events are in a log; when they were.
pub(crate) async fn wait_sequenced(
    store: &Store,
    n: i64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let done = store.log_leaf_count().await?;
        if done >= n {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{done} of {n} events sequenced after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let Bench {
        args,
        config,
        scratch,
        store,
        ..
    } = bench;
    let n = args.log_events;
    println!(
        "auditbridge bench, log: {n} stored events, {} tenant(s)",
        args.log_tenants
    );
    let load_started = Instant::now();
    crate::query::load(scratch, store, n, args.log_tenants).await?;
    let load_rate = n as f64 / load_started.elapsed().as_secs_f64();
    scratch.analyze().await?;
    scratch.checkpoint().await?;

    // 2. Catch-up from a standing start.
    let key = auditbridge_tlog::SignerKey::generate("bench.auditbridge/log")?;
    let key_path = std::env::temp_dir().join(format!("ab-bench-logkey-{}", scratch.tag));
    std::fs::write(&key_path, key.to_private_text())?;
    let key_s = key_path.to_string_lossy().into_owned();
    let already = store.log_leaf_count().await?;
    let started = Instant::now();
    let mut worker = spawn_worker(
        scratch,
        &[
            ("AUDITBRIDGE_LOG_KEY_FILE", key_s.as_str()),
            ("AUDITBRIDGE_LOG_CHECKPOINT_INTERVAL", "1s"),
        ],
        "127.0.0.1:0",
    )?;
    let result = async {
        let done = wait_sequenced(store, n as i64, Duration::from_secs(3_600)).await?;
        let rate = (n as i64 - already) as f64 / done.duration_since(started).as_secs_f64();
        println!(
            "catch-up      {} events sequenced in {:.1}s by one worker from a standing start: {:>9.0} events/s  (the load wrote {:.0} events/s through the store's writer)",
            n as i64 - already,
            done.duration_since(started).as_secs_f64(),
            rate,
            load_rate
        );
        let tenant = scratch.sample().await?.tenant;
        let size = store.log_size(&tenant).await?;
        // Wait for the checkpoint of the whole log: proofs are against the newest signed one.
        let deadline = Instant::now() + Duration::from_secs(60);
        while store
            .newest_signed_checkpoint(&tenant)
            .await?
            .is_none_or(|c| c.tree_size < size)
        {
            if Instant::now() > deadline {
                bail!("no checkpoint of {tenant}'s {size} events within a minute");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // 3. Storage.
        let sizes = store.log_storage().await?;
        let per = |b: i64| b as f64 / n as f64;
        println!(
            "storage       per event: log {:.1} bytes (leaves {:.1}, stored subtrees {:.2}, checkpoints {:.2}), next to audit_events' {:.0} bytes (tables and indexes)",
            per(sizes.leaves + sizes.nodes + sizes.checkpoints),
            per(sizes.leaves),
            per(sizes.nodes),
            per(sizes.checkpoints),
            per(sizes.events)
        );

        // 4. Proofs of random events of the largest log.
        let picks: Vec<u64> = (0..SAMPLES)
            .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % size)
            .collect();
        let mut ids: Vec<(uuid::Uuid, u64)> = Vec::with_capacity(picks.len());
        for index in picks {
            if let Some(e) = store
                .logged_events(&tenant, index, index + 1, 1)
                .await?
                .into_iter()
                .next()
            {
                ids.push((e.event_id, e.index));
            }
        }
        let mut raw = Vec::with_capacity(ids.len());
        for (id, _) in &ids {
            let t = Instant::now();
            let entry = store
                .log_entry(*id, Some(&tenant))
                .await?
                .context("a sequenced event")?;
            let newest = store
                .newest_signed_checkpoint(&tenant)
                .await?
                .context("a checkpoint")?;
            store
                .log_range_hashes(&tenant, &inclusion_ranges(entry.index, newest.tree_size))
                .await?;
            raw.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let api = BenchApi::start(config, &[Scope::Read]).await?;
        let http = reqwest::Client::new();
        let mut served = Vec::with_capacity(ids.len());
        let proofs = async {
            for (id, index) in &ids {
                let t = Instant::now();
                let resp = http
                    .get(format!("{}/v1/events/{id}/proof", api.base))
                    .bearer_auth(&api.token)
                    .send()
                    .await?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await?;
                served.push(t.elapsed().as_secs_f64() * 1000.0);
                if !status.is_success() || body["log_index"] != *index {
                    bail!("GET /v1/events/{id}/proof: {status} {body}");
                }
            }
            anyhow::Ok(())
        }
        .await;
        api.stop().await;
        proofs?;
        let (Some((p50, p99, max, k)), Some((r50, r99, _, _))) =
            (latencies(served), latencies(raw))
        else {
            bail!("no proofs measured");
        };
        println!(
            "proofs        GET /v1/events/{{id}}/proof in a log of {size} events, {k} random events: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms  (target p99 <= 10 ms; the store's lookups alone: p50 {r50:.2} ms, p99 {r99:.2} ms)"
        );
        anyhow::Ok(())
    }
    .await;
    worker.stop(STOP_GRACE).await;
    let _ = std::fs::remove_file(&key_path);
    result
}
