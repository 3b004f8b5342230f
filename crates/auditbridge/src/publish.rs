//! `auditbridge publish`: synthetic traffic (`--generate N`) or JSON lines from standard
//! input, published to JetStream with `Nats-Msg-Id: <tenant>:<id>` and confirmed by JetStream
//! acks.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use auditbridge_config::Config;
use auditbridge_event::{Event, synth::Generator};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
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

/// One message to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub subject: String,
    /// The `Nats-Msg-Id`, tenant-scoped: `<tenant>:<id>` ([`Event::message_id`]).
    pub msg_id: String,
    pub payload: Bytes,
}

impl Outgoing {
    pub(crate) fn from_event(event: &Event, prefix: &str) -> Outgoing {
        Outgoing {
            subject: event.subject(prefix),
            msg_id: event.message_id(),
            payload: Bytes::from(serde_json::to_vec(event).expect("an Event always serializes")),
        }
    }
}

/// What a publish run achieved.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Report {
    /// Acknowledged by JetStream (stored, or recognised as a duplicate).
    pub acked: u64,
    /// Of those, recognised as re-sends inside the duplicate window.
    pub duplicates: u64,
    /// Not acknowledged after every retry.
    pub failed: u64,
}

/// Most publishes awaiting their acknowledgement at once.
const MAX_IN_FLIGHT: usize = 4096;
/// Attempts per message before it counts as failed.
const ATTEMPTS: u32 = 5;

type InFlight =
    std::pin::Pin<Box<dyn Future<Output = (Outgoing, u32, anyhow::Result<bool>)> + Send>>;

async fn send(js: &jetstream::Context, out: Outgoing, attempt: u32) -> InFlight {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", out.msg_id.as_str());
    let sent = js
        .publish_with_headers(out.subject.clone(), headers, out.payload.clone())
        .await;
    Box::pin(async move {
        let result = match sent {
            Ok(ack) => wait_ack(ack).await,
            Err(e) => Err(anyhow::Error::from(e)),
        };
        (out, attempt, result)
    })
}

async fn wait_ack(ack: PublishAckFuture) -> anyhow::Result<bool> {
    Ok(ack.await?.duplicate)
}

/// Publishes everything `messages` yields, paced to `rate` events/s if given, with at most
/// [`MAX_IN_FLIGHT`] unacknowledged; retries a failed publish (same `Nats-Msg-Id`, so
/// JetStream stores it once) with a growing pause.
pub(crate) async fn publish_all(
    js: &jetstream::Context,
    messages: impl Stream<Item = Outgoing>,
    rate: Option<f64>,
) -> Report {
    let mut report = Report::default();
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut sent: u64 = 0;
    let interval = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    tokio::pin!(messages);

    let settle = |report: &mut Report,
                  done: (Outgoing, u32, anyhow::Result<bool>)|
     -> Option<(Outgoing, u32)> {
        let (out, attempt, result) = done;
        match result {
            Ok(duplicate) => {
                report.acked += 1;
                report.duplicates += u64::from(duplicate);
                None
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::debug!(msg_id = %out.msg_id, error = %e, attempt, message = "Publish not acknowledged; retrying.");
                Some((out, attempt + 1))
            }
            Err(e) => {
                tracing::warn!(msg_id = %out.msg_id, error = %e, message = "Publish failed after every retry.");
                report.failed += 1;
                None
            }
        }
    };

    loop {
        // Pace before taking the next message, so a stream that stamps its items when they
        // are taken (the benchmark does) stamps them when they are really sent.
        if let Some(step) = interval {
            let due = started + step.mul_f64(sent as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let Some(out) = messages.next().await else {
            break;
        };
        while in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(done) = in_flight.next().await
                && let Some((out, attempt)) = settle(&mut report, done)
            {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                let next = send(js, out, attempt).await;
                in_flight.push(next);
            }
        }
        // Awaited before `push` (which takes `&self`), so no borrow of the set is held across
        // the await and the future stays `Send`.
        let next = send(js, out, 1).await;
        in_flight.push(next);
        sent += 1;
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            tracing::info!(sent, acked = report.acked, message = "Publishing.");
        }
    }
    while let Some(done) = in_flight.next().await {
        if let Some((out, attempt)) = settle(&mut report, done) {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            let next = send(js, out, attempt).await;
            in_flight.push(next);
        }
    }
    report
}

pub(crate) async fn run(args: Args, config: &Config) -> anyhow::Result<ExitCode> {
    let client =
        auditbridge_runtime::nats::connect(&config.nats_url, "auditbridge-publish").await?;
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
                .map(move |_| Outgoing::from_event(&generator.next_event(), &prefix));
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
                            let out = Outgoing {
                                subject: event.subject(&prefix),
                                msg_id: event.message_id(),
                                payload: Bytes::from(line),
                            };
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
