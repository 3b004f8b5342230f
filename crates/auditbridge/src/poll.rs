//! `auditbridge poll [NAME]`: pulls the configured `api` sources (or the one named) into
//! JetStream until SIGTERM/SIGINT. Every process running it takes part in each source's lease
//! in PostgreSQL; the holder polls, the others stand by to take over (see
//! `auditbridge_sources::poll`). `--replay-rejects` publishes the items a mapping could not
//! take, after a fix of the mapping, and exits.
//!
//! Connects to PostgreSQL with `AUDITBRIDGE_DATABASE_URL`, meant to be the
//! `auditbridge_poller` role: it may write a source's cursor, lease and rejects, nothing else.
//! Serves `/metrics`, `/healthz` and `/readyz` (NATS and PostgreSQL up) on
//! `AUDITBRIDGE_METRICS_ADDR` like the worker.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_config::api_source::ApiParams;
use auditbridge_runtime::ops::{self, Health};
use auditbridge_runtime::shutdown::Deadline;
use auditbridge_runtime::telemetry;
use auditbridge_sources::poll::Poller;
use auditbridge_sources::{Publisher, SourceKind};
use auditbridge_store::Store;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Pull audit logs from other systems' APIs (the `api` sources of the configuration).
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Poll only the source with this name (default: every `api` source).
    name: Option<String>,
    /// Map the items kept as rejects again (after a fix of the mapping), publish those that
    /// map now, record the outcome of each, and exit.
    #[arg(long)]
    replay_rejects: bool,
}

/// How long one publish may wait for its acks before it is retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(args: Args, config: &Config) -> anyhow::Result<ExitCode> {
    let sources: Vec<(String, ApiParams)> = config
        .sources
        .iter()
        .filter_map(|s| match &s.kind {
            SourceKind::Api(p) => Some((s.name.clone(), (**p).clone())),
            SourceKind::Webhook(_) | SourceKind::File(_) => None,
        })
        .filter(|(name, _)| args.name.as_ref().is_none_or(|n| n == name))
        .collect();
    if sources.is_empty() {
        match &args.name {
            Some(n) => {
                eprintln!("error: no api source named {n:?} in [[sources]] / AUDITBRIDGE_SOURCES");
            }
            None => {
                eprintln!("error: no source of type \"api\" in [[sources]] / AUDITBRIDGE_SOURCES");
            }
        }
        return Ok(ExitCode::from(2));
    }

    let store = Store::connect_lazy(config.database_url.expose(), 4)
        .with_context(|| format!("AUDITBRIDGE_DATABASE_URL={}", config.database_url))?;
    let client =
        auditbridge_runtime::nats::connect(config.nats_url.expose(), "auditbridge-poll").await?;
    let js = jetstream::new(client.clone());
    // As `publish` does: events polled before the first worker starts are kept, not refused.
    auditbridge_runtime::provision::ensure_stream(&js, config)
        .await
        .context("making sure the stream exists")?;
    let holder = auditbridge_runtime::holder_id();
    let mut pollers = Vec::with_capacity(sources.len());
    for (name, params) in sources {
        let poller = Poller::new(
            name,
            params,
            Publisher::new(js.clone(), ACK_TIMEOUT),
            store.clone(),
            holder.clone(),
            config.subject_prefix.clone(),
            config.ingest.max_event_bytes,
        );
        match poller {
            Ok(p) => pollers.push(p),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    if args.replay_rejects {
        return replay(pollers, store, client).await;
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding AUDITBRIDGE_METRICS_ADDR={}", config.metrics_addr))?;
    tracing::info!(metrics = %listener.local_addr()?, holder = %holder, message = "Metrics listening.");
    let health = Arc::new(Health::for_service());
    let ops_server = tokio::spawn(ops::serve(
        listener,
        health.clone(),
        telemetry::prometheus(),
        shutdown.clone(),
    ));
    tokio::spawn(ops::watch_connections(
        Some(store.clone()),
        client.clone(),
        health,
        shutdown.clone(),
    ));
    tokio::spawn(auditbridge_runtime::db_role::warn_if_privileged(
        store.clone(),
        "poll",
        auditbridge_store::roles::POLLER,
        shutdown.clone(),
    ));

    let mut running = JoinSet::new();
    for poller in pollers {
        let token = shutdown.clone();
        running.spawn(async move { poller.run(token).await });
    }
    // As in `tail-file`: a source that cannot run stops the others, and the exit says so.
    let failed = AtomicBool::new(false);
    let stop_all = async {
        while let Some(done) = running.join_next().await {
            let error = match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("api source task: {e}"),
            };
            tracing::error!(%error, message = "Api source stopped; stopping the others.");
            failed.store(true, Ordering::Relaxed);
            shutdown.cancel();
        }
    };
    tokio::pin!(stop_all);
    let ended = tokio::select! {
        () = &mut stop_all => true,
        _ = shutdown.cancelled() => false,
    };
    // A page in flight is abandoned at the deadline: its cursor did not move, so the next
    // holder fetches it again and its ids deduplicate.
    let deadline = Deadline::after(config.shutdown_timeout);
    if !ended {
        deadline
            .within("stopping the api sources", &mut stop_all)
            .await;
    }
    let failed = failed.load(Ordering::Relaxed);
    shutdown.cancel();
    deadline
        .within("flushing publishes to NATS", client.flush())
        .await;
    deadline.within("stopping the ops server", ops_server).await;
    deadline.within("closing the database", store.close()).await;
    tracing::info!(message = "poll stopped.");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `--replay-rejects`: one pass over each source's open rejects.
async fn replay(
    pollers: Vec<Poller<Publisher>>,
    store: Store,
    client: async_nats::Client,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for poller in &pollers {
        match poller.replay_rejects().await {
            Ok(r) => println!(
                "api source {}: {} reject(s) published, {} refused again (still open)",
                poller.name(),
                r.published,
                r.refused
            ),
            Err(e) => {
                failed = true;
                eprintln!(
                    "error: api source {}: replaying rejects: {e}",
                    poller.name()
                );
            }
        }
    }
    client.flush().await.ok();
    store.close().await;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
