//! `auditbridge bench --only ingest`: end-to-end throughput and latency of the ingest path
//! (NATS to PostgreSQL through one worker process), printed next to the raw limit measured in
//! the same run on the same machine.
//!
//! 1. Raw limit: the same rows written by `COPY` straight into a copy of `audit_events`.
//! 2. Throughput: N events published as fast as JetStream acknowledges them while the worker
//!    consumes; measured from the first publish until the last row is visible.
//! 3. Latency: events at a fixed rate; a poller sees each commit (every 5 ms) and the time
//!    from publish to "visible in PostgreSQL" is recorded per event. The poll interval makes
//!    this a slight over-estimate of publish-to-commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_event::synth::Generator;
use auditbridge_fixtures::{Scratch, synthetic};
use auditbridge_sources::{Outgoing, publish_all};
use auditbridge_store::{NewEvent, Position};
use futures::StreamExt as _;
use uuid::Uuid;

use crate::{Args, Bench, STOP_GRACE, latencies, spawn_worker};

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let Bench {
        args,
        config,
        scratch,
        store,
        js,
    } = bench;
    println!(
        "auditbridge bench: {} events, {} tenants, latency at {}/s for {}s",
        args.events, args.tenants, args.latency_rate, args.latency_seconds
    );
    let events = synthetic(&mut Generator::new(7, args.tenants), args.events);
    let mean_bytes = events.iter().map(|(_, r)| r.len()).sum::<usize>() / events.len().max(1);
    println!("mean event size: {mean_bytes} bytes");

    // 1. Raw limit.
    let rows: Vec<NewEvent<'_>> = events
        .iter()
        .map(|(event, raw)| NewEvent {
            event,
            raw,
            redaction: None,
        })
        .collect();
    let raw = scratch.raw_copy(&rows, 10_000).await?;
    let raw_rate = events.len() as f64 / raw.as_secs_f64();
    println!(
        "raw limit     COPY into a copy of audit_events (10k rows/txn): {:>9.0} rows/s",
        raw_rate
    );
    drop(rows);

    // The stream and consumer exist before the worker starts, so the clock measures work.
    let stream = auditbridge_runtime::provision::ensure_stream(js, config).await?;
    auditbridge_runtime::provision::ensure_consumer(&stream, config).await?;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let destination = if args.with_destination {
        Some(
            serde_json::json!([{
                "name": "bench-ingest-relay",
                "type": "rabbitmq",
                "params": {
                    "url": "amqp://guest:guest@127.0.0.1:5672/%2f",
                    "exchange": "amq.topic",
                    "mode": "batch",
                    "mandatory": false,
                    "start": "now",
                }
            }])
            .to_string(),
        )
    } else {
        None
    };
    let extra: Vec<(&str, &str)> = destination
        .iter()
        .map(|d| ("AUDITBRIDGE_DESTINATIONS", d.as_str()))
        .collect();
    let mut worker = spawn_worker(scratch, &extra, &metrics.to_string())?;
    if args.with_destination {
        println!(
            "destination   the worker relays to one RabbitMQ destination (batch mode, amq.topic) while it ingests"
        );
    }

    // 2. Throughput.
    let prefix = config.subject_prefix.clone();
    let started = Instant::now();
    let publisher = {
        let js = js.clone();
        let outgoing: Vec<Outgoing> = events
            .iter()
            .map(|(e, raw)| Outgoing::new(e, &prefix, Some(raw.clone())))
            .collect();
        tokio::spawn(async move {
            let report = publish_all(&js, futures::stream::iter(outgoing), None).await;
            (report, started.elapsed())
        })
    };
    // Done when the consumer's ack floor reaches the last message: the worker acks only after
    // commit. Asking NATS keeps the measurement off PostgreSQL's CPU; the row count is
    // checked once at the end.
    let deadline = Instant::now() + Duration::from_secs(600);
    let last_seq = loop {
        let info = stream.get_info().await?;
        let consumer = stream.consumer_info(&config.consumer).await?;
        if info.state.messages as usize >= events.len()
            && consumer.ack_floor.stream_sequence >= info.state.last_sequence
        {
            break info.state.last_sequence;
        }
        if Instant::now() > deadline {
            let _ = worker.child.kill().await;
            bail!(
                "the worker did not store {} events within 10 minutes",
                events.len()
            );
        }
        if let Some(status) = worker.exited() {
            bail!("the worker exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    let stored = scratch.count_events().await?;
    if stored != events.len() as i64 {
        bail!(
            "expected {} stored events, found {stored} (stream seq {last_seq})",
            events.len()
        );
    }
    let (report, publish_elapsed) = publisher.await?;
    if report.failed > 0 {
        bail!("{} publishes failed", report.failed);
    }
    let rate = events.len() as f64 / elapsed.as_secs_f64();
    // The worker also sequences every event into its tenant's verifiable log: how far it was
    // at the last commit, and when it had caught up.
    let sequenced_at_commit = store.log_leaf_count().await?;
    let caught_up =
        crate::log::wait_sequenced(store, events.len() as i64, Duration::from_secs(600)).await?;
    let seq_elapsed = caught_up.saturating_duration_since(started);
    let seq_rate = events.len() as f64 / seq_elapsed.as_secs_f64();
    if args.with_destination {
        let relayed: i64 = store
            .destinations()
            .await?
            .iter()
            .map(|d| d.delivered_total)
            .sum();
        println!(
            "destination   relayed {relayed} of {} events by the last commit",
            events.len()
        );
    }
    println!(
        "publish       {} events acknowledged by JetStream in {:.2}s: {:>9.0} events/s",
        report.acked,
        publish_elapsed.as_secs_f64(),
        report.acked as f64 / publish_elapsed.as_secs_f64()
    );
    println!(
        "pipeline      first publish to last commit, 1 worker:        {:>9.0} events/s  ({:.2} of raw COPY; target >= 30000 and >= 0.70)",
        rate,
        rate / raw_rate
    );
    println!(
        "sequencer     {sequenced_at_commit} of {} events in their logs at the last commit; all {:.2}s after the first publish: {:>9.0} events/s  ({:.2} of the pipeline's rate; target: keeps up)",
        events.len(),
        seq_elapsed.as_secs_f64(),
        seq_rate,
        seq_rate / rate
    );
    drop(events);

    // 3. Latency at a fixed rate, in steady state: the bulk load above leaves about a
    // gigabyte of WAL whose checkpoint would otherwise land inside this run.
    scratch.checkpoint().await?;
    let before = commit_histogram(metrics).await?;
    let latencies = latency_run(args, config, scratch, js).await?;
    let after = commit_histogram(metrics).await?;
    let commit = Histogram::between(&before, &after);
    let rss = worker.peak_rss_kib();

    worker.stop(STOP_GRACE).await;
    println!(
        "latency       publish to commit at {}/s (worker histogram, {} events): p50 {:.1} ms, p99 {:.1} ms, {:.2}% within 100 ms  (target p99 <= 100 ms)",
        args.latency_rate,
        commit.count(),
        commit.quantile(0.5) * 1000.0,
        commit.quantile(0.99) * 1000.0,
        commit.share_within(0.1) * 100.0
    );
    match latencies {
        Some((p50, p99, max, n)) => println!(
            "              publish to visible in the outbox (stricter: waits for every older batch too, {n} events): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            p50, p99, max
        ),
        None => println!("latency       no events observed"),
    }
    match rss {
        Some(kib) => println!(
            "worker RSS    peak {:.1} MB  (target <= 150 MB)",
            kib as f64 / 1024.0
        ),
        None => println!("worker RSS    unavailable"),
    }
    Ok(())
}

/// Publishes at a fixed rate and watches commits appear; returns (p50, p99, max) in ms.
async fn latency_run(
    args: &Args,
    config: &Config,
    scratch: &Scratch,
    js: &jetstream::Context,
) -> anyhow::Result<Option<(f64, f64, f64, usize)>> {
    let total = (args.latency_rate * args.latency_seconds as f64) as usize;
    let sent_at: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let mut generator = Generator::new(11, args.tenants);
    let prefix = config.subject_prefix.clone();
    // Start from the newest stored event, so only this run's events are timed.
    let mut position = Position::start();
    loop {
        let (ids, next) = scratch.ids_after(&position).await?;
        position = next;
        if ids.is_empty() {
            break;
        }
    }

    let publisher = {
        let js = js.clone();
        let sent_at = sent_at.clone();
        let rate = args.latency_rate;
        tokio::spawn(async move {
            let messages = futures::stream::iter(0..total).map(move |_| {
                let e = generator.next_event();
                sent_at
                    .lock()
                    .expect("not poisoned")
                    .insert(e.id, Instant::now());
                Outgoing::new(&e, &prefix, None)
            });
            publish_all(&js, messages, Some(rate)).await
        })
    };

    let mut seen: Vec<f64> = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(args.latency_seconds + 120);
    while seen.len() < total && Instant::now() < deadline {
        let (ids, next) = scratch.ids_after(&position).await?;
        let now = Instant::now();
        position = next;
        {
            let sent = sent_at.lock().expect("not poisoned");
            seen.extend(
                ids.iter()
                    .filter_map(|id| sent.get(id))
                    .map(|t| now.duration_since(*t).as_secs_f64() * 1000.0),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    publisher.await?;
    Ok(latencies(seen))
}

/// Cumulative bucket counts of `auditbridge_publish_to_commit_seconds`: (upper bound, count).
type Buckets = Vec<(f64, f64)>;

/// Reads the worker's publish-to-commit histogram from its `/metrics`.
async fn commit_histogram(addr: std::net::SocketAddr) -> anyhow::Result<Buckets> {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    let prefix = "auditbridge_publish_to_commit_seconds_bucket{le=\"";
    Ok(body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect())
}

/// The observations made between two scrapes of a cumulative histogram.
struct Histogram(Buckets);

impl Histogram {
    fn between(before: &Buckets, after: &Buckets) -> Histogram {
        Histogram(
            after
                .iter()
                .map(|(le, n)| {
                    let was = before
                        .iter()
                        .find(|(b, _)| b == le)
                        .map_or(0.0, |(_, c)| *c);
                    (*le, n - was)
                })
                .collect(),
        )
    }

    fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, n)| *n)
    }

    fn share_within(&self, seconds: f64) -> f64 {
        let within = self
            .0
            .iter()
            .find(|(le, _)| (*le - seconds).abs() < 1e-9)
            .map_or(0.0, |(_, n)| *n);
        within / self.count().max(1.0)
    }

    /// Linear interpolation inside the bucket the quantile falls in.
    fn quantile(&self, q: f64) -> f64 {
        let target = q * self.count();
        let mut lower = (0.0, 0.0);
        for &(le, n) in &self.0 {
            if n >= target {
                if !le.is_finite() {
                    return lower.0;
                }
                let span = (n - lower.1).max(1e-9);
                return lower.0 + (le - lower.0) * ((target - lower.1) / span);
            }
            lower = (le, n);
        }
        lower.0
    }
}
