//! `auditbridge bench --only retention`: expiring one partition of about 1,000,000 events
//! while ingest goes on, next to the raw limit measured in the same run.
//!
//! 1. A scratch database of its own with 30-second partitions and a tenant kept one second;
//!    N events of that tenant (default 1,000,000, ~600 bytes each) written by SQL into the
//!    current partition of its class, then ANALYZE.
//! 2. Raw limit: one plain scan of those rows (`count(*)`, the times) as PostgreSQL runs it.
//! 3. Ingest: a writer stores batches of 100 synthetic events of another tenant through the
//!    store's batch writer, back to back, timing each; first alone, then while the partition
//!    is expired (counted, receipts signed, dropped) by the worker's own expiry.
//! 4. Prints the expiry's time next to the raw scan, and ingest's longest batch during it
//!    next to its longest alone (the target: ingest never stalls more than 100 ms).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use auditbridge_event::synth::Generator;
use auditbridge_fixtures::{Env, Purpose, Scratch, synthetic};
use auditbridge_store::{RetentionPolicy, Store};

use crate::{Bench, latencies, persist_synthetic};

/// The tenant whose partition expires, and its retention.
const EXPIRING: &str = "expiring";
const INTERVAL: Duration = Duration::from_secs(30);

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let n = bench.args.retention_events;
    println!("auditbridge bench, retention: expire a partition of {n} events while ingest runs");
    let policy = RetentionPolicy {
        partition_interval: INTERVAL,
        tenants: vec![(EXPIRING.into(), Some(Duration::from_secs(1)))],
        ..Default::default()
    };
    let scratch = Scratch::create_with(
        Purpose::Bench,
        &bench.scratch.database_url,
        &bench.scratch.nats_url,
        Some(&policy),
    )
    .await?;
    let result = run(&scratch, n).await;
    scratch.remove().await;
    result
}

async fn run(scratch: &Scratch, n: usize) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&scratch.database_url, 4)?;
    let started = Instant::now();
    // Every row in one partition: the current one of class 1, whatever the load takes.
    let at = scratch.fill_partition(EXPIRING, 1, n).await?;
    scratch.analyze().await?;
    println!(
        "load          {n} events of tenant {EXPIRING:?} in one partition in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Due once the partition's end plus a second has passed.
    scratch
        .wait_partition_ended(1, at, Duration::from_secs(1))
        .await?;
    let (count, raw) = scratch.scan_tenant(EXPIRING).await?;
    anyhow::ensure!(count as usize == n, "{count} of {n} rows stored");

    // Ingest alone, then during the expiry.
    let alone = ingest_for(&store, Duration::from_secs(3)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move { ingest_until(&store, &stop).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The expiry a worker runs on schedule, as `auditbridge retention run` (this very
    // binary) runs it on demand.
    let exe = std::env::current_exe().context("locating the auditbridge binary")?;
    let expiring = Instant::now();
    let out = scratch
        .command(&exe, &["retention", "run"], Env::Inherit)
        .env("AUDITBRIDGE_LOG", "error")
        .env(
            "AUDITBRIDGE_PARTITION_INTERVAL",
            format!("{}s", INTERVAL.as_secs()),
        )
        .env(
            "AUDITBRIDGE_RETENTION",
            format!(r#"[{{"tenant": "{EXPIRING}", "keep": "1s"}}]"#),
        )
        .output()
        .await?;
    let took = expiring.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let during = writer.await??;
    anyhow::ensure!(
        out.status.success() && said.contains(&format!("expired 1 partition(s), {n} event(s)")),
        "expiry did not remove the {n} events: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "expire        {n} events (one partition: counted, receipts stored, dropped) in {:.2}s; raw limit: one scan of the same rows {:.2}s ({:.1}x)",
        took.as_secs_f64(),
        raw.as_secs_f64(),
        took.as_secs_f64() / raw.as_secs_f64().max(1e-9)
    );
    let show = |what: &str, l: Option<(f64, f64, f64, usize)>| match l {
        Some((p50, p99, max, count)) => println!(
            "ingest        {what}: {count} batches of 100, p50 {p50:.1} ms, p99 {p99:.1} ms, longest {max:.1} ms"
        ),
        None => println!("ingest        {what}: no batch"),
    };
    show("alone", latencies(alone));
    let longest = latencies(during.clone()).map_or(0.0, |l| l.2);
    show("during the expiry", latencies(during));
    println!(
        "stall         ingest's longest batch during the expiry {longest:.1} ms (target: at most 100 ms beyond its longest alone)"
    );
    store.close().await;
    Ok(())
}

/// Batches of 100 synthetic events of tenant `steady`, back to back for `d`; each one's
/// latency in ms.
async fn ingest_for(store: &Store, d: Duration) -> anyhow::Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let seen = ingest_until(store, &stop).await;
    timer.abort();
    seen
}

async fn ingest_until(store: &Store, stop: &AtomicBool) -> anyhow::Result<Vec<f64>> {
    let mut generator = Generator::new(77, 1);
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut events = synthetic(&mut generator, 100);
        for (e, raw) in &mut events {
            e.tenant = "steady".into();
            *raw = serde_json::to_vec(e)?.into();
        }
        let t = Instant::now();
        persist_synthetic(store, &events).await?;
        seen.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(seen)
}
