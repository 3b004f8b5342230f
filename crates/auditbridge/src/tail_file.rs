//! `auditbridge tail-file [NAME]`: follows the configured `file` sources (or the one named)
//! and publishes their lines to JetStream until SIGTERM/SIGINT. The position of each file is
//! kept in its state file, so a restart resumes exactly (see `auditbridge_sources::tail`).
//! Serves `/metrics`, `/healthz` and `/readyz` (NATS connected) on `AUDITBRIDGE_METRICS_ADDR`
//! like the worker.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_runtime::ops::{self, Health};
use auditbridge_runtime::shutdown::Deadline;
use auditbridge_runtime::telemetry;
use auditbridge_sources::tail::Tail;
use auditbridge_sources::{Publisher, SourceKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Follow JSONL files (the `file` sources of the configuration) into JetStream.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Follow only the source with this name (default: every `file` source).
    name: Option<String>,
}

/// How long one publish may wait for its acks before it is retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(args: Args, config: &Config) -> anyhow::Result<ExitCode> {
    let files: Vec<_> = config
        .sources
        .iter()
        .filter_map(|s| match &s.kind {
            SourceKind::File(p) => Some((s.name.clone(), p.clone())),
            SourceKind::Webhook(_) | SourceKind::Api(_) => None,
        })
        .filter(|(name, _)| args.name.as_ref().is_none_or(|n| n == name))
        .collect();
    if files.is_empty() {
        match &args.name {
            Some(n) => {
                eprintln!("error: no file source named {n:?} in [[sources]] / AUDITBRIDGE_SOURCES");
            }
            None => {
                eprintln!("error: no source of type \"file\" in [[sources]] / AUDITBRIDGE_SOURCES");
            }
        }
        return Ok(ExitCode::from(2));
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding AUDITBRIDGE_METRICS_ADDR={}", config.metrics_addr))?;
    tracing::info!(metrics = %listener.local_addr()?, message = "Metrics listening.");
    let client =
        auditbridge_runtime::nats::connect(config.nats_url.expose(), "auditbridge-tail-file")
            .await?;
    let health = Arc::new(Health::for_publisher());
    let ops_server = tokio::spawn(ops::serve(
        listener,
        health.clone(),
        telemetry::prometheus(),
        shutdown.clone(),
    ));
    tokio::spawn(ops::watch_connections(
        None,
        client.clone(),
        health,
        shutdown.clone(),
    ));
    let js = jetstream::new(client.clone());
    // As `publish` does: lines read before the first worker starts are kept, not refused.
    auditbridge_runtime::provision::ensure_stream(&js, config)
        .await
        .context("making sure the stream exists")?;

    let mut tails = JoinSet::new();
    for (name, params) in files {
        let tail = Tail::new(
            name.clone(),
            params,
            Publisher::new(js.clone(), ACK_TIMEOUT),
            config.subject_prefix.clone(),
            config.ingest.max_event_bytes,
        );
        let token = shutdown.clone();
        tails.spawn(async move { (name, tail.run(token).await) });
    }
    // Whether a source stopped on an error: kept outside `stop_all`, so that a stop cut at the
    // deadline still exits as the sources ended (abandoning what is in flight is safe: its
    // lines are read again from the saved position).
    let failed = AtomicBool::new(false);
    let stop_all = async {
        while let Some(done) = tails.join_next().await {
            let error = match done {
                Ok((_, Ok(()))) => continue,
                Ok((name, Err(e))) => format!("file source {name}: {e}"),
                Err(e) => format!("file source task: {e}"),
            };
            tracing::error!(%error, message = "File source stopped; stopping the others.");
            failed.store(true, Ordering::Relaxed);
            shutdown.cancel();
        }
    };
    tokio::pin!(stop_all);
    let ended = tokio::select! {
        () = &mut stop_all => true,
        _ = shutdown.cancelled() => false,
    };
    // Tails stop promptly once cancelled (a publish in flight is abandoned), but the whole
    // stop is bounded by one deadline anyway.
    let deadline = Deadline::after(config.shutdown_timeout);
    if !ended {
        deadline
            .within("stopping the file sources", &mut stop_all)
            .await;
    }
    let failed = failed.load(Ordering::Relaxed);
    shutdown.cancel();
    deadline
        .within("flushing publishes to NATS", client.flush())
        .await;
    deadline.within("stopping the ops server", ops_server).await;
    tracing::info!(message = "tail-file stopped.");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
