//! `auditbridge bench --only http-ingest`: `POST /v1/ingest` with NDJSON batches, next to the
//! raw limit measured in the same run (the same events, batches and concurrency published to
//! JetStream by the same publisher the server uses, every ack awaited, without HTTP).
//!
//! 1. Raw: N events straight to JetStream.
//! 2. HTTP, nothing consuming: N events through `serve` (in process, on a free port).
//! 3. HTTP with a worker consuming live: once a worker has stored everything so far, N more
//!    events through `serve`; the time until the last of them is stored gives the end-to-end
//!    rate.

use auditbridge_config::Scope;
use std::time::{Duration, Instant};

use anyhow::bail;
use auditbridge_event::Event;
use auditbridge_event::synth::Generator;
use auditbridge_sources::{Outgoing, Publisher, Sink as _};
use futures::StreamExt as _;

use crate::{Bench, BenchApi, STOP_GRACE, spawn_worker};

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let Bench {
        args,
        config,
        scratch,
        js,
        ..
    } = bench;
    let n = args.http_events;
    let batch = args.http_batch;
    let clients = args.http_clients;
    println!(
        "auditbridge bench, HTTP ingest: {n} events per run, NDJSON batches of {batch}, {clients} concurrent clients"
    );
    auditbridge_runtime::provision::ensure_stream(js, config).await?;
    // Earlier parts of a full run share the database: count from here.
    let before = scratch.count_events().await?;
    let mut generator = Generator::new(77, args.tenants);
    let mut events = |n: usize| -> Vec<Event> { (0..n).map(|_| generator.next_event()).collect() };

    // 1. Raw.
    let raw_events = events(n);
    let mean = raw_events
        .iter()
        .map(|e| serde_json::to_vec(e).map_or(0, |v| v.len()))
        .sum::<usize>()
        / n.max(1);
    let batches: Vec<Vec<Outgoing>> = raw_events
        .chunks(batch)
        .map(|c| {
            c.iter()
                .map(|e| Outgoing::new(e, &config.subject_prefix, None))
                .collect()
        })
        .collect();
    let publisher = Publisher::new(js.clone(), Duration::from_secs(30));
    let started = Instant::now();
    let results: Vec<bool> = futures::stream::iter(&batches)
        .map(|b| {
            let p = publisher.clone();
            async move { p.publish(b).await.is_ok() }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    if !results.iter().all(|ok| *ok) {
        bail!("raw publishing failed");
    }
    let raw_rate = n as f64 / started.elapsed().as_secs_f64();
    println!(
        "raw limit     JetStream publish with acks, same batches and clients: {raw_rate:>9.0} msg/s  (events of ~{mean} bytes)"
    );
    drop(batches);

    // The server, in process, with an ingest token for every tenant.
    let api = BenchApi::start(config, &[Scope::Ingest]).await?;
    let (url, token) = (format!("{}/v1/ingest", api.base), api.token.clone());
    let http = reqwest::Client::new();

    let result = async {
        // 2. HTTP, nothing consuming.
        let idle_rate = post_all(&http, &url, &token, &events(n), batch, clients).await? as f64;
        println!(
            "http ingest   nothing consuming:              {idle_rate:>9.0} events/s  ({:.2} of raw; target >= 20000)",
            idle_rate / raw_rate
        );

        // 3. With a worker consuming live.
        let mut worker = spawn_worker(scratch, &[], "127.0.0.1:0")?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while scratch.count_events().await? < before + 2 * n as i64 {
            if Instant::now() > deadline {
                bail!("the worker did not store the first {} events in 10 minutes", 2 * n);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let started = Instant::now();
        let live_rate = post_all(&http, &url, &token, &events(n), batch, clients).await? as f64;
        while scratch.count_events().await? < before + 3 * n as i64 {
            if Instant::now() > deadline {
                bail!("the worker did not store the HTTP events in 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stored = started.elapsed();
        worker.stop(STOP_GRACE).await;
        println!(
            "http ingest   a worker consuming at the time: {live_rate:>9.0} events/s accepted; the last stored {:.2}s after the first request: {:>9.0} events/s end to end",
            stored.as_secs_f64(),
            n as f64 / stored.as_secs_f64()
        );
        anyhow::Ok(())
    }
    .await;
    api.stop().await;
    result
}

/// Posts `events` in NDJSON batches from `clients` concurrent clients; events/s accepted.
async fn post_all(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    events: &[Event],
    batch: usize,
    clients: usize,
) -> anyhow::Result<u64> {
    let bodies: Vec<String> = events
        .chunks(batch)
        .map(|c| {
            c.iter()
                .map(|e| serde_json::to_string(e).expect("events serialize") + "\n")
                .collect()
        })
        .collect();
    let started = Instant::now();
    let statuses: Vec<u16> = futures::stream::iter(bodies)
        .map(|body| {
            let req = http
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/x-ndjson")
                .body(body);
            async move { req.send().await.map_or(0, |r| r.status().as_u16()) }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let failed = statuses.iter().filter(|s| **s != 202).count();
    if failed > 0 {
        bail!("{failed} of {} batches were not accepted", statuses.len());
    }
    Ok((events.len() as f64 / elapsed.as_secs_f64()) as u64)
}
