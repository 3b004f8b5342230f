//! `auditbridge bench`: end-to-end throughput and latency of the ingest path, printed next to
//! the raw limit measured in the same run on the same machine.
//!
//! Everything runs against the real services with names of its own (a fresh database, subject
//! prefix, stream and consumer), and a real worker process (this binary, `worker`), so the
//! figures include NATS, validation, the transaction and the acks, and the worker's peak RSS
//! can be read from /proc.
//!
//! 1. Raw limit: the same rows written by `COPY` straight into a copy of `audit_events`.
//! 2. Throughput: N events published as fast as JetStream acknowledges them while the worker
//!    consumes; measured from the first publish until the last row is visible.
//! 3. Latency: events at a fixed rate; a poller sees each commit (every 5 ms) and the time
//!    from publish to "visible in PostgreSQL" is recorded per event. The poll interval makes
//!    this a slight over-estimate of publish-to-commit.

use std::collections::HashMap;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_event::{Event, synth::Generator};
use auditbridge_store::{NewEvent, Position, Store};
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::process::{Child, Command};
use uuid::Uuid;

use auditbridge_sources::{Outgoing, publish_all};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Events for the throughput run (and for the raw limit).
    #[arg(long, default_value_t = 300_000)]
    pub(crate) events: usize,
    /// Events per second for the latency run.
    #[arg(long, default_value_t = 5_000.0)]
    latency_rate: f64,
    /// Length of the latency run.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Tenants in the generated traffic.
    #[arg(long, default_value_t = 50)]
    pub(crate) tenants: usize,
    /// Keep the benchmark's database and stream afterwards.
    #[arg(long)]
    keep: bool,
    /// Which part to run.
    #[arg(long, value_enum, default_value_t = Part::All)]
    only: Part,
    /// Ingest: the worker also relays to one RabbitMQ destination (`batch` mode, `amq.topic`,
    /// `mandatory = false`, `start = now`) while it ingests, as a production worker does.
    #[arg(long, default_value_t = false)]
    with_destination: bool,
    /// Forwarding: stored events to drain as a backlog, per mode.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) backlog: usize,
    /// Forwarding: messages for the raw RabbitMQ limit.
    #[arg(long, default_value_t = 60_000)]
    pub(crate) raw_messages: usize,
    /// Forwarding: events per second for the latency run.
    #[arg(long, default_value_t = 2_000.0)]
    pub(crate) forward_rate: f64,
    /// Forwarding: length of the latency run.
    #[arg(long, default_value_t = 10)]
    pub(crate) forward_seconds: u64,
    /// Query: events stored before the query API is measured.
    #[arg(long, default_value_t = 5_000_000)]
    pub(crate) query_events: usize,
    /// Query: events written while a live tail follows them.
    #[arg(long, default_value_t = 300_000)]
    pub(crate) tail_events: usize,
    /// HTTP ingest: events per run.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) http_events: usize,
    /// HTTP ingest: events per NDJSON request.
    #[arg(long, default_value_t = 1000)]
    pub(crate) http_batch: usize,
    /// HTTP ingest: concurrent clients.
    #[arg(long, default_value_t = 4)]
    pub(crate) http_clients: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    All,
    Ingest,
    Forward,
    Query,
    HttpIngest,
}

pub(crate) struct Names {
    database_url: String,
    prefix: String,
    pub(crate) stream: String,
    consumer: String,
}

impl Names {
    fn new(config: &Config) -> Names {
        let tag = Uuid::now_v7().simple().to_string()[20..].to_owned();
        let base = &config.database_url[..config.database_url.len() - config.database_name().len()];
        Names {
            database_url: format!("{base}ab_bench_{tag}"),
            prefix: format!("bench{tag}"),
            stream: format!("ABB_{tag}"),
            consumer: format!("bench_{tag}"),
        }
    }

    fn config(&self, config: &Config) -> Config {
        let mut c = config.clone();
        c.database_url = self.database_url.clone();
        c.subject_prefix = self.prefix.clone();
        c.stream = self.stream.clone();
        c.consumer = self.consumer.clone();
        c
    }
}

pub(crate) async fn run(args: Args, config: &Config) -> anyhow::Result<ExitCode> {
    let names = Names::new(config);
    let bench_config = names.config(config);
    auditbridge_store::migrate(&names.database_url).await?;
    let store = Store::connect_lazy(&names.database_url, 4)?;
    let client = auditbridge_runtime::nats::connect(&config.nats_url, "auditbridge-bench").await?;
    let js = jetstream::new(client.clone());

    let mut result = Ok(());
    if matches!(args.only, Part::All | Part::Ingest) {
        result = measure(&args, &bench_config, &names, &store, &js).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::Forward) {
        result = crate::bench_forward::measure(&args, &bench_config, &names, &store, &js).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::HttpIngest) {
        result = crate::bench_http::measure(&args, &bench_config, &names, &store, &js).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::Query) {
        result = crate::bench_query::measure(&args, &bench_config, &store).await;
    }

    if !args.keep {
        let _ = js.delete_stream(&names.stream).await;
        store.close().await;
        let _ = auditbridge_store::drop_database(&names.database_url).await;
    } else {
        println!(
            "kept database {} and stream {}",
            auditbridge_config::redact_url(&names.database_url),
            names.stream
        );
    }
    result.map(|()| ExitCode::SUCCESS)
}

async fn measure(
    args: &Args,
    config: &Config,
    names: &Names,
    store: &Store,
    js: &jetstream::Context,
) -> anyhow::Result<()> {
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
        .map(|(event, raw)| NewEvent { event, raw })
        .collect();
    let raw = store.bench_raw_copy(&rows, 10_000).await?;
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
    let destination: Vec<(&str, String)> = if args.with_destination {
        vec![(
            "AUDITBRIDGE_DESTINATIONS",
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
        )]
    } else {
        Vec::new()
    };
    let mut worker = spawn_worker_at(names, config, &destination, &metrics.to_string())?;
    let pid = worker.id().context("worker pid")?;
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
            let _ = worker.kill().await;
            bail!(
                "the worker did not store {} events within 10 minutes",
                events.len()
            );
        }
        if let Ok(Some(status)) = worker.try_wait() {
            bail!("the worker exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    let stored = store.count_events().await?;
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
    drop(events);

    // 3. Latency at a fixed rate, in steady state: the bulk load above leaves about a
    // gigabyte of WAL whose checkpoint would otherwise land inside this run.
    store.bench_checkpoint().await?;
    let before = commit_histogram(metrics).await?;
    let latencies = latency_run(args, config, store, js).await?;
    let after = commit_histogram(metrics).await?;
    let commit = Histogram::between(&before, &after);
    let rss = peak_rss_kib(pid);

    stop_worker(&mut worker).await;
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
    store: &Store,
    js: &jetstream::Context,
) -> anyhow::Result<Option<(f64, f64, f64, usize)>> {
    let total = (args.latency_rate * args.latency_seconds as f64) as usize;
    let sent_at: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let mut generator = Generator::new(11, args.tenants);
    let prefix = config.subject_prefix.clone();
    // Start from the newest stored event, so only this run's events are timed.
    let mut position = Position::start();
    loop {
        let (ids, next) = store.bench_ids_after(&position).await?;
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
        let (ids, next) = store.bench_ids_after(&position).await?;
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
    if seen.is_empty() {
        return Ok(None);
    }
    seen.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| seen[((seen.len() as f64 - 1.0) * p).round() as usize];
    Ok(Some((q(0.5), q(0.99), q(1.0), seen.len())))
}

pub(crate) fn spawn_worker(
    names: &Names,
    config: &Config,
    extra: &[(&str, String)],
) -> anyhow::Result<Child> {
    spawn_worker_at(names, config, extra, "127.0.0.1:0")
}

/// Like [`spawn_worker`], serving `/metrics` on `metrics`.
fn spawn_worker_at(
    names: &Names,
    config: &Config,
    extra: &[(&str, String)],
    metrics: &str,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the auditbridge binary")?;
    Command::new(exe)
        .arg("worker")
        .env("AUDITBRIDGE_DATABASE_URL", &names.database_url)
        .env("AUDITBRIDGE_SUBJECT_PREFIX", &names.prefix)
        .env("AUDITBRIDGE_STREAM", &names.stream)
        .env("AUDITBRIDGE_CONSUMER", &names.consumer)
        .env("AUDITBRIDGE_NATS_URL", &config.nats_url)
        .env("AUDITBRIDGE_METRICS_ADDR", metrics)
        .env(
            "AUDITBRIDGE_LOG",
            std::env::var("AUDITBRIDGE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker")
}

pub(crate) async fn stop_worker(worker: &mut Child) {
    if let Some(pid) = worker.id() {
        // SIGTERM, as an operator would; the worker drains and exits.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .is_err()
    {
        let _ = worker.kill().await;
    }
}

/// VmHWM: the peak resident set of a process, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// VmRSS: the current resident set of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
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

/// Writes `events` (as [`synthetic`] makes them) in one batch straight through the store's
/// writer, without NATS: how the benchmarks fill a backlog or a trail.
pub(crate) async fn persist_synthetic(
    store: &Store,
    events: &[(Event, Bytes)],
) -> anyhow::Result<()> {
    let rows: Vec<NewEvent<'_>> = events
        .iter()
        .map(|(event, raw)| NewEvent { event, raw })
        .collect();
    store.persist(&rows, &[]).await?;
    Ok(())
}

/// `n` synthetic events, each with its JSON as published.
pub(crate) fn synthetic(generator: &mut Generator, n: usize) -> Vec<(Event, Bytes)> {
    (0..n)
        .map(|_| {
            let e = generator.next_event();
            let raw = Bytes::from(serde_json::to_vec(&e).expect("events serialize"));
            (e, raw)
        })
        .collect()
}

/// `auditbridge serve` in process on free ports, with one admin token, for the parts that
/// measure the API.
pub(crate) struct BenchApi {
    /// `http://127.0.0.1:<port>`.
    pub(crate) base: String,
    pub(crate) token: String,
    shutdown: tokio_util::sync::CancellationToken,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchApi {
    pub(crate) async fn start(config: &Config, scopes: &[&str]) -> anyhow::Result<BenchApi> {
        let token = auditbridge_api::auth::generate_token();
        let mut api_config = config.clone();
        api_config.api_addr = "127.0.0.1:0".parse()?;
        api_config.metrics_addr = "127.0.0.1:0".parse()?;
        api_config.api_tokens = vec![serde_json::json!({
            "name": "bench", "admin": true, "scopes": scopes,
            "sha256": auditbridge_api::auth::hash_token(&token)
        })];
        let server = auditbridge_api::Server::build(api_config).await?;
        let base = format!("http://{}", server.local_addr());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(server.run(shutdown.clone()));
        Ok(BenchApi {
            base,
            token,
            shutdown,
            serving,
        })
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.serving).await;
    }
}
