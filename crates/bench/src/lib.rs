//! `auditbridge bench`: what the pipeline achieves end to end on this machine, each figure
//! printed next to the raw limit measured in the same run (what PostgreSQL, RabbitMQ or
//! JetStream manage on their own).
//!
//! Everything runs against the real services in a scratch corner of its own (a fresh
//! database, subject prefix, stream and consumer: [`auditbridge_fixtures::Scratch`]) with
//! real worker processes of the running binary, so the figures include NATS, validation, the
//! transactions and the acks, and a worker's resident set can be read from `/proc`. The parts:
//! `ingest.rs` (NATS to PostgreSQL), `forward.rs` (PostgreSQL to RabbitMQ), `formats.rs`
//! (schemas and redaction rules in forwarding), `http.rs`
//! (`POST /v1/ingest`), `api_poll.rs` (an `api` source pulling pages from a local API),
//! `query.rs` (the query API and the live tail), `log.rs` (the verifiable log: catch-up,
//! storage, proofs).

mod api_poll;
mod formats;
mod forward;
mod http;
mod ingest;
mod log;
mod query;
mod retention;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use auditbridge_config::{Config, SecretUrl};
use auditbridge_event::Event;
use auditbridge_fixtures::{Env, Process, Purpose, Scratch};
use auditbridge_store::{NewEvent, Store};
use bytes::Bytes;

/// Measure end-to-end throughput and latency next to the raw limits of this machine.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events for the throughput run (and for the raw limit).
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Events per second for the latency run.
    #[arg(long, default_value_t = 5_000.0)]
    latency_rate: f64,
    /// Length of the latency run.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Tenants in the generated traffic.
    #[arg(long, default_value_t = 50)]
    tenants: usize,
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
    backlog: usize,
    /// Formats: stored events drained through each schema and transport.
    #[arg(long, default_value_t = 200_000)]
    formats_backlog: usize,
    /// Api poll: events pulled from the local API (rounded up to whole pages of 1,000).
    #[arg(long, default_value_t = 200_000)]
    poll_events: usize,
    /// Forwarding: messages for the raw RabbitMQ limit.
    #[arg(long, default_value_t = 60_000)]
    raw_messages: usize,
    /// Forwarding: events per second for the latency run.
    #[arg(long, default_value_t = 2_000.0)]
    forward_rate: f64,
    /// Forwarding: length of the latency run.
    #[arg(long, default_value_t = 10)]
    forward_seconds: u64,
    /// Query: events stored before the query API is measured.
    #[arg(long, default_value_t = 5_000_000)]
    query_events: usize,
    /// Query: events written while a live tail follows them.
    #[arg(long, default_value_t = 300_000)]
    tail_events: usize,
    /// HTTP ingest: events per run.
    #[arg(long, default_value_t = 200_000)]
    http_events: usize,
    /// HTTP ingest: events per NDJSON request.
    #[arg(long, default_value_t = 1000)]
    http_batch: usize,
    /// HTTP ingest: concurrent clients.
    #[arg(long, default_value_t = 4)]
    http_clients: usize,
    /// Log: events stored, then sequenced from a standing start, before proofs are measured.
    #[arg(long, default_value_t = 5_000_000)]
    log_events: usize,
    /// Log: tenants of those events (1: one tree of all of them, the deepest proofs).
    #[arg(long, default_value_t = 1)]
    log_tenants: usize,
    /// Retention: events in the partition that is expired while ingest runs.
    #[arg(long, default_value_t = 1_000_000)]
    retention_events: usize,
    /// The partition interval of the benchmark's database (the query part's load of
    /// --query-events spans about a dozen partitions of 20 s on this machine).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    partition_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    All,
    Ingest,
    Forward,
    Formats,
    Query,
    HttpIngest,
    ApiPoll,
    Log,
    Retention,
}

/// Runs the parts `args` asks for, in a scratch corner of the services `config` names, and
/// prints their figures.
pub async fn run(args: Args, config: &Config) -> anyhow::Result<ExitCode> {
    let policy = auditbridge_store::RetentionPolicy {
        partition_interval: Duration::from_secs(args.partition_interval.as_secs().max(1)),
        ..Default::default()
    };
    let scratch = Scratch::create_with(
        Purpose::Bench,
        config.database_url.expose(),
        config.nats_url.expose(),
        Some(&policy),
    )
    .await?;
    let bench_config = scratch_config(&scratch, config);
    let store = Store::connect_lazy(&scratch.database_url, 4)?;
    let client =
        auditbridge_runtime::nats::connect(config.nats_url.expose(), "auditbridge-bench").await?;
    let js = jetstream::new(client.clone());

    let bench = Bench {
        args: &args,
        config: &bench_config,
        scratch: &scratch,
        store: &store,
        js: &js,
    };
    let mut result = Ok(());
    if matches!(args.only, Part::All | Part::Ingest) {
        result = ingest::measure(bench).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::Forward) {
        result = forward::measure(bench).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::Formats) {
        result = formats::measure(bench).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::HttpIngest) {
        result = http::measure(bench).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::ApiPoll) {
        result = api_poll::measure(bench).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::Query) {
        result = query::measure(bench).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::Log) {
        result = log::measure(bench).await;
    }
    if result.is_ok() && matches!(args.only, Part::All | Part::Retention) {
        result = retention::measure(bench).await;
    }

    store.close().await;
    if args.keep {
        println!(
            "kept database {} and stream {}",
            auditbridge_config::redact_url(&scratch.database_url),
            scratch.stream
        );
        scratch.keep();
    } else {
        scratch.remove().await;
    }
    result.map(|()| ExitCode::SUCCESS)
}

/// What every part measures with.
#[derive(Clone, Copy)]
struct Bench<'a> {
    args: &'a Args,
    /// The configuration pointed at the scratch corner.
    config: &'a Config,
    scratch: &'a Scratch,
    store: &'a Store,
    /// The benchmark's own connection, for publishing.
    js: &'a jetstream::Context,
}

/// `config` pointed at the scratch corner.
fn scratch_config(scratch: &Scratch, config: &Config) -> Config {
    let mut c = config.clone();
    c.database_url = SecretUrl::unchecked(scratch.database_url.clone());
    c.subject_prefix = scratch.prefix.clone();
    c.stream = scratch.stream.clone();
    c.consumer = scratch.consumer.clone();
    c
}

/// How long a worker gets to drain after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Starts `auditbridge worker` (this very binary: the benchmark is a subcommand of it) on the
/// scratch corner, with the caller's environment (so an operator's tuning applies), `extra`
/// variables, `/metrics` on `metrics`, and `AUDITBRIDGE_LOG` (default `warn`).
fn spawn_worker(
    scratch: &Scratch,
    extra: &[(&str, &str)],
    metrics: &str,
) -> anyhow::Result<Process> {
    let exe = std::env::current_exe().context("locating the auditbridge binary")?;
    let log = std::env::var("AUDITBRIDGE_LOG").unwrap_or_else(|_| "warn".into());
    let mut vars = vec![
        ("AUDITBRIDGE_METRICS_ADDR", metrics),
        ("AUDITBRIDGE_LOG", log.as_str()),
    ];
    vars.extend_from_slice(extra);
    scratch.spawn_worker(&exe, Env::Inherit, &vars, None)
}

/// (p50, p99, max, count) of latencies in ms; `None` when nothing was seen.
fn latencies(mut seen: Vec<f64>) -> Option<(f64, f64, f64, usize)> {
    if seen.is_empty() {
        return None;
    }
    seen.sort_by(f64::total_cmp);
    let q = |p: f64| seen[((seen.len() as f64 - 1.0) * p).round() as usize];
    Some((q(0.5), q(0.99), q(1.0), seen.len()))
}

/// Writes `events` (as [`auditbridge_fixtures::synthetic`] makes them) in one batch straight
/// through the store's writer, without NATS: how the benchmarks fill a backlog or a trail.
async fn persist_synthetic(store: &Store, events: &[(Event, Bytes)]) -> anyhow::Result<()> {
    let rows: Vec<NewEvent<'_>> = events
        .iter()
        .map(|(event, raw)| NewEvent {
            event,
            raw,
            redaction: None,
        })
        .collect();
    store.persist(&rows, &[]).await?;
    Ok(())
}

/// `auditbridge serve` in process on free ports, with one admin token, for the parts that
/// measure the API.
struct BenchApi {
    /// `http://127.0.0.1:<port>`.
    base: String,
    token: String,
    shutdown: tokio_util::sync::CancellationToken,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchApi {
    async fn start(
        config: &Config,
        scopes: &[auditbridge_config::Scope],
    ) -> anyhow::Result<BenchApi> {
        let token = auditbridge_api::auth::generate_token();
        let mut api_config = config.clone();
        api_config.api_addr = "127.0.0.1:0".parse()?;
        api_config.metrics_addr = "127.0.0.1:0".parse()?;
        api_config.api_tokens = vec![auditbridge_config::ApiToken {
            name: "bench".into(),
            sha256: auditbridge_api::auth::digest_token(&token),
            tenant: None,
            scopes: scopes.to_vec(),
        }];
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

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.serving).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_nearest_rank_of_the_sorted_samples() {
        assert_eq!(latencies(Vec::new()), None);
        let seen: Vec<f64> = (1..=101).rev().map(f64::from).collect();
        assert_eq!(latencies(seen), Some((51.0, 100.0, 101.0, 101)));
    }
}
