//! The Auditbridge worker: consumes the shared JetStream consumer, persists batches to
//! PostgreSQL, and acknowledges after commit. Any number of workers can run; they keep no
//! local state.
//!
//! [`Worker::build`] connects nothing yet but binds the metrics port (so a test can bind port
//! 0 and read the address); [`Worker::run`] then works until its shutdown token is cancelled.

mod checkpoints;
mod ingest;
mod lease;
mod relay;
pub mod retention;
mod sequencer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_runtime::ops::{self, Health};
use auditbridge_runtime::provision::{self, ProvisionError};
use auditbridge_runtime::shutdown::Deadline;
use auditbridge_runtime::telemetry::{CONSUMER_ACK_PENDING, CONSUMER_PENDING, prometheus};
use auditbridge_runtime::{db_role, retry_backoff};
use auditbridge_store::{Store, StoreError};
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ingest::{Ingest, Stopped};

/// The most of a stop's deadline kept for flushing acknowledgements after the batch in flight.
const FLUSH_RESERVE: Duration = Duration::from_secs(1);

/// A worker, built and ready to run.
pub struct Worker {
    config: Config,
    destinations: Vec<auditbridge_destinations::DestinationConfig>,
    /// The log's signing key (`AUDITBRIDGE_LOG_KEY_FILE`), read at build.
    log_key: Option<auditbridge_tlog::SignerKey>,
    listener: TcpListener,
    prometheus: PrometheusHandle,
    health: Arc<Health>,
}

impl Worker {
    /// Binds the metrics address and installs the metrics recorder (the configuration
    /// checked the destinations at load).
    pub async fn build(config: Config) -> anyhow::Result<Worker> {
        let destinations = config.destinations.clone();
        let log_key = match &config.log_key_file {
            None => None,
            Some(path) => Some(read_log_key(path)?),
        };
        let listener = TcpListener::bind(config.metrics_addr)
            .await
            .with_context(|| format!("binding AUDITBRIDGE_METRICS_ADDR={}", config.metrics_addr))?;
        Ok(Worker {
            config,
            destinations,
            log_key,
            listener,
            prometheus: prometheus(),
            health: Arc::new(Health::for_consumer()),
        })
    }

    /// The address `/metrics`, `/healthz` and `/readyz` are served on.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` is cancelled, then stops pulling, finishes the batch in flight,
    /// flushes acknowledgements, stops the relays and closes connections, all within one
    /// `shutdown_timeout` (what is left unfinished at the deadline is abandoned, safely).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Worker {
            config,
            destinations,
            log_key,
            listener,
            prometheus,
            health,
        } = self;
        let tasks = TaskTracker::new();
        let background = CancellationToken::new();
        // Relays stop at shutdown, and also when ingest ends by itself (a fatal error): they
        // must not hold the stop for its whole deadline.
        let stopping = shutdown.child_token();

        let store = Store::connect_lazy(
            config.database_url.expose(),
            config.ingest.db_max_connections,
        )?
        .with_notify(!destinations.is_empty());
        let nats =
            auditbridge_runtime::nats::connect(config.nats_url.expose(), "auditbridge-worker")
                .await?;
        let js = jetstream::new(nats.clone());

        tasks.spawn(ops::serve(
            listener,
            health.clone(),
            prometheus,
            background.clone(),
        ));
        tasks.spawn(db_role::warn_if_privileged(
            store.clone(),
            "worker",
            auditbridge_store::roles::WRITER,
            background.clone(),
        ));
        tasks.spawn(ops::watch_connections(
            Some(store.clone()),
            nats.clone(),
            health.clone(),
            background.clone(),
        ));

        tasks.spawn(retention::maintain(
            store.clone(),
            retention::policy_of(&config),
            background.clone(),
        ));
        // Expiry, on a pool of its own, by the holder of the `_retention` lease.
        tasks.spawn(retention::supervise(
            Store::connect_lazy(config.database_url.expose(), 2)?,
            log_key.clone(),
            auditbridge_runtime::holder_id(),
            config.lease_ttl,
            stopping.clone(),
        ));

        // The sequencer, on a pool of its own (two connections: it works one batch at a time,
        // and reports and checkpoints beside it): it competes for the `_log` lease like a
        // relay, so exactly one worker sequences.
        tasks.spawn(sequencer::supervise(
            sequencer::Sequencer {
                store: Store::connect_lazy(config.database_url.expose(), 2)?,
                holder: auditbridge_runtime::holder_id(),
                lease_ttl: config.lease_ttl,
                key: log_key,
                checkpoint_interval: config.log_checkpoint_interval,
            },
            stopping.clone(),
        ));

        if !destinations.is_empty() {
            // Relays get a pool of their own: a slow destination can never take a connection
            // the ingest path needs (guarantee 3).
            let tasks_n =
                destinations.len() + destinations.iter().filter(|d| d.kind.checkpoints()).count();
            let relay_store =
                Store::connect_lazy(config.database_url.expose(), tasks_n as u32 + 3)?;
            let (wake_tx, wake_rx) = tokio::sync::watch::channel(0u64);
            tasks.spawn(relay::listen(
                relay_store.clone(),
                wake_tx,
                background.clone(),
            ));
            let ctx = Arc::new(relay::RelayContext {
                store: relay_store,
                holder: auditbridge_runtime::holder_id(),
                lease_ttl: config.lease_ttl,
                wake: wake_rx,
            });
            tracing::info!(holder = %ctx.holder, destinations = destinations.len(), message = "Relaying destinations.");
            for d in destinations {
                if d.kind.checkpoints() {
                    tasks.spawn(checkpoints::supervise(
                        d.clone(),
                        ctx.clone(),
                        stopping.clone(),
                    ));
                }
                tasks.spawn(relay::supervise(d, ctx.clone(), stopping.clone()));
            }
        }

        let ingest = Ingest {
            store: store.clone(),
            subject_prefix: config.subject_prefix.clone(),
            stream: config.stream.clone(),
            config: config.ingest.clone(),
            health: health.clone(),
            nats: nats.clone(),
            redact: config.redact.clone(),
        };
        let work = ingest_until_stopped(&config, &js, &ingest, &health, &background, &shutdown);
        tokio::pin!(work);
        let ended = tokio::select! {
            r = &mut work => Some(r),
            _ = shutdown.cancelled() => None,
        };
        stopping.cancel();
        // From here on every step shares one deadline: AUDITBRIDGE_SHUTDOWN_TIMEOUT bounds the
        // whole stop.
        let deadline = Deadline::after(config.shutdown_timeout);
        let result = match ended {
            Some(r) => r,
            // What is abandoned stays unacknowledged and is redelivered. A tenth of the budget
            // (at most a second) stays for flushing the acks of the batches that did commit.
            None => deadline
                .sooner_by(FLUSH_RESERVE.min(config.shutdown_timeout / 10))
                .within("finishing the batch in flight", &mut work)
                .await
                .unwrap_or(Ok(())),
        };
        // Acknowledgements are buffered in the client: send them before going away (any not
        // sent are redelivered and deduplicated).
        deadline
            .within("flushing acknowledgements to NATS", nats.flush())
            .await;
        background.cancel();
        tasks.close();
        // Relays finish (or abandon) the delivery in flight; unconfirmed events are simply
        // sent again by the next holder.
        deadline
            .within("stopping relays and tasks", tasks.wait())
            .await;
        deadline
            .within("closing database connections", store.close())
            .await;
        tracing::info!(message = "Worker stopped.");
        result
    }
}

/// Provisions the stream and consumer (retrying while NATS or PostgreSQL is unavailable),
/// then consumes; provisions again if the consumer is deleted under us.
async fn ingest_until_stopped(
    config: &Config,
    js: &jetstream::Context,
    ingest: &Ingest,
    health: &Health,
    background: &CancellationToken,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = retry_backoff();
    let mut attempts = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let step = async {
            match ingest.store.check_schema().await {
                Err(e @ StoreError::NotMigrated { .. }) => return Err(Fatal(e.into())),
                Err(e) => {
                    return Err(Retry(
                        anyhow::Error::from(e).context("checking the database schema"),
                    ));
                }
                Ok(()) => relay::warn_if_outbox_moved(&ingest.store).await,
            }
            let stream = provision::ensure_stream(js, config)
                .await
                .map_err(classify)?;
            let consumer = provision::ensure_consumer(&stream, config)
                .await
                .map_err(classify)?;
            Ok((stream, consumer))
        };
        let (stream, consumer) = match step.await {
            Ok(v) => v,
            Err(Fatal(e)) => return Err(e),
            Err(Retry(e)) => {
                attempts += 1;
                if attempts == 1 || attempts.is_multiple_of(10) {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        attempts,
                        message = "Cannot start consuming yet; retrying."
                    );
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        attempts = 0;
        health.set_consumer(true);
        tracing::info!(stream = %config.stream, consumer = %config.consumer, subjects = %provision::stream_subject(&config.subject_prefix), message = "Consuming.");

        let watcher = tokio::spawn(watch_consumer(
            stream,
            config.consumer.clone(),
            background.child_token(),
        ));
        let stopped = ingest.consume(&consumer, shutdown).await;
        watcher.abort();
        health.set_consumer(false);
        match stopped {
            Ok(Stopped::Shutdown) => return Ok(()),
            Ok(Stopped::ConsumerLost) => {
                tracing::error!(consumer = %config.consumer, message = "The consumer was deleted; provisioning it again.");
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    message = "Consuming stopped; starting again."
                );
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

enum Step {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}
use Step::{Fatal, Retry};

/// Configuration conflicts on the stream or consumer need a person; everything else (NATS
/// down, timeouts) is retried.
fn classify(e: ProvisionError) -> Step {
    if e.is_retryable() {
        Retry(e.into())
    } else {
        Fatal(e.into())
    }
}

/// Publishes the consumer's pending and ack-pending counts as gauges.
async fn watch_consumer(
    stream: jetstream::stream::Stream,
    consumer: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(info) = stream.consumer_info(&consumer).await {
            gauge!(CONSUMER_PENDING).set(info.num_pending as f64);
            gauge!(CONSUMER_ACK_PENDING).set(info.num_ack_pending as f64);
        }
    }
}

/// This worker's name as a lease holder: host, process and a random part (a restarted
/// process is a new holder).
/// Reads and checks `AUDITBRIDGE_LOG_KEY_FILE` (a signed-note private key).
pub fn read_log_key(path: &std::path::Path) -> anyhow::Result<auditbridge_tlog::SignerKey> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "AUDITBRIDGE_LOG_KEY_FILE={}: cannot read the log's key",
            path.display()
        )
    })?;
    auditbridge_tlog::SignerKey::parse(&text).map_err(|e| {
        anyhow::anyhow!(
            "AUDITBRIDGE_LOG_KEY_FILE={}: {e} (make one with `auditbridge log keygen`)",
            path.display()
        )
    })
}
