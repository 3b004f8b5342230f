//! `auditbridge publish`: synthetic traffic (`--generate N`) or JSON lines from standard
//! input, published to JetStream with `Nats-Msg-Id: <tenant>:<id>` and confirmed by JetStream
//! acks.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_event::synth::Generator;
use auditbridge_sources::{Outgoing, publish_all};
use bytes::Bytes;
use futures::stream::StreamExt as _;
use tokio::io::AsyncBufReadExt as _;

/// Publish events to JetStream and wait for its acknowledgements.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Publish N synthetic events (realistic tenants, actions, actors) instead of reading
    /// JSON lines from standard input.
    #[arg(long, value_name = "N")]
    generate: Option<u64>,
    /// Number of distinct tenants for --generate.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    tenants: u64,
    /// Events per second (default: as fast as JetStream acknowledges).
    #[arg(long)]
    rate: Option<f64>,
    /// Seed for --generate, for repeatable traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub(crate) async fn run(args: Args, config: &Config) -> anyhow::Result<ExitCode> {
    let client =
        auditbridge_runtime::nats::connect(config.nats_url.expose(), "auditbridge-publish").await?;
    let js = jetstream::new(client.clone());
    // The stream normally exists (workers create it); creating it here too means events
    // published before the first worker starts are kept, not refused.
    auditbridge_runtime::provision::ensure_stream(&js, config)
        .await
        .context("making sure the stream exists")?;
    let prefix = config.subject_prefix.clone();
    let started = Instant::now();

    let (report, invalid) = match args.generate {
        Some(n) => {
            let tenants = usize::try_from(args.tenants).unwrap_or(usize::MAX);
            let mut generator = Generator::new(args.seed, tenants);
            let events = futures::stream::iter(0..n)
                .map(move |_| Outgoing::new(&generator.next_event(), &prefix, None));
            (publish_all(&js, events, args.rate).await, 0)
        }
        None => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Outgoing>(1024);
            let max = config.ingest.max_event_bytes;
            let reader = tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                let mut invalid = 0u64;
                let mut number = 0u64;
                while let Some(line) = lines.next_line().await.context("reading standard input")? {
                    number += 1;
                    if line.trim().is_empty() {
                        continue;
                    }
                    match auditbridge_event::decode(line.as_bytes(), max) {
                        Ok(event) => {
                            let out = Outgoing::new(&event, &prefix, Some(Bytes::from(line)));
                            if tx.send(out).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            invalid += 1;
                            eprintln!("line {number}: not published: {e}");
                        }
                    }
                }
                anyhow::Ok(invalid)
            });
            let report = publish_all(
                &js,
                tokio_stream::wrappers::ReceiverStream::new(rx),
                args.rate,
            )
            .await;
            (report, reader.await??)
        }
    };
    client.flush().await.ok();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published {} events in {:.1}s ({:.0}/s): {} acknowledged by JetStream ({} duplicates), {} failed{}",
        report.acked + report.failed,
        secs,
        report.acked as f64 / secs.max(1e-9),
        report.acked,
        report.duplicates,
        report.failed,
        if invalid > 0 {
            format!(", {invalid} invalid lines not published")
        } else {
            String::new()
        }
    );
    Ok(if report.failed > 0 || invalid > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
