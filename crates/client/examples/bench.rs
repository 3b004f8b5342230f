//! `record()` latency with NATS up and down, and the rate the client sustains.
//!
//! ```sh
//! cargo run --release -p auditbridge-client --example bench
//! ```
//!
//! Uses the NATS at `AUDITBRIDGE_NATS_URL` (default `nats://127.0.0.1:4222`) with a stream of
//! its own, created and deleted here. "NATS down" points a client at a closed port, with the
//! file store (fsync `always`) in a temporary directory.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use auditbridge_client::{Client, ClientBuilder, Event, FileParams, OnFull, StoreConfig};
use auditbridge_event::synth::Generator;

const PACED_EVENTS: usize = 50_000;
const PACED_RATE: u64 = 10_000;
const WARM_UP: usize = 2_000;
const THROUGHPUT_EVENTS: usize = 300_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url =
        std::env::var("AUDITBRIDGE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let tag = &auditbridge_client::Uuid::now_v7().simple().to_string()[20..];
    let prefix = format!("abbench{tag}");
    let stream = format!("ABBENCH_{tag}");
    let js = jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        max_messages: 2_000_000,
        ..Default::default()
    })
    .await?;
    let result = run(&url, &prefix).await;
    js.delete_stream(&stream).await?;
    result
}

async fn run(url: &str, prefix: &str) -> anyhow::Result<()> {
    let mut generator = Generator::new(7, 50);
    let sample = generator.next_event();
    println!(
        "events: synthetic, ~{} bytes of JSON; record() timed around the call only",
        serde_json::to_vec(&sample)?.len()
    );

    // What record() does before handing over, without the queue: validate and serialize.
    let mut work = Vec::with_capacity(PACED_EVENTS);
    for e in (0..PACED_EVENTS).map(|_| generator.next_event()) {
        let started = Instant::now();
        e.validate()?;
        let mut payload = Vec::with_capacity(1024);
        serde_json::to_writer(&mut payload, &e)?;
        std::hint::black_box((payload, e.subject(prefix)));
        work.push(started.elapsed());
    }
    report_latency("validate + serialize alone (no queue)", work);

    // NATS up, memory store, paced like a busy service.
    let up = ClientBuilder::default()
        .nats_url(url)
        .subject_prefix(prefix)
        .connect()
        .await?;
    let latencies = paced(&up, &mut generator).await?;
    up.flush(Duration::from_secs(60)).await?;
    report(&format!("NATS up, {PACED_RATE} events/s"), latencies, &up);

    // Sustained: as fast as the caller can go; OnFull::Wait turns a full queue into waiting.
    let fast = ClientBuilder::default()
        .nats_url(url)
        .subject_prefix(prefix)
        .on_full(OnFull::Wait(Duration::from_secs(10)))
        .queue_capacity(16_384)
        .connect()
        .await?;
    let events: Vec<Event> = (0..THROUGHPUT_EVENTS)
        .map(|_| generator.next_event())
        .collect();
    let started = Instant::now();
    for e in events {
        fast.record(e).await?;
    }
    let recorded = started.elapsed();
    fast.flush(Duration::from_secs(120)).await?;
    let acked = started.elapsed();
    let stats = fast.stats();
    println!(
        "sustained, NATS up: {THROUGHPUT_EVENTS} events recorded in {:.2} s, all acknowledged after {:.2} s -> {:.0} events/s published and acked ({} acked)",
        recorded.as_secs_f64(),
        acked.as_secs_f64(),
        THROUGHPUT_EVENTS as f64 / acked.as_secs_f64(),
        stats.published_events
    );
    up.close(Duration::from_secs(5)).await?;
    fast.close(Duration::from_secs(5)).await?;

    // NATS down: a closed port, the file store.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let dir = std::env::temp_dir().join(format!("abbench-{}", auditbridge_client::Uuid::now_v7()));
    let down = ClientBuilder::default()
        .nats_url(format!("nats://{closed}"))
        .subject_prefix(prefix)
        .store(StoreConfig::File(FileParams::new(&dir)))
        // Only ever waits in the sustained run below, when the caller outpaces the disk.
        .on_full(OnFull::Wait(Duration::from_secs(10)))
        .connect()
        .await?;
    let latencies = paced(&down, &mut generator).await?;
    wait_stored(&down, PACED_EVENTS as u64).await?;
    report(
        &format!("NATS down, file store (fsync always), {PACED_RATE} events/s"),
        latencies,
        &down,
    );
    let before = down.stats().buffered_events;
    let events: Vec<Event> = (0..THROUGHPUT_EVENTS / 3)
        .map(|_| generator.next_event())
        .collect();
    let started = Instant::now();
    for e in events {
        down.record(e).await?;
    }
    wait_stored(&down, before + (THROUGHPUT_EVENTS / 3) as u64).await?;
    let took = started.elapsed();
    println!(
        "sustained, NATS down: {} events into the file store in {:.2} s -> {:.0} events/s",
        THROUGHPUT_EVENTS / 3,
        took.as_secs_f64(),
        (THROUGHPUT_EVENTS / 3) as f64 / took.as_secs_f64()
    );
    let _ = down.close(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Records PACED_EVENTS at PACED_RATE (in 1 ms steps), timing each call.
async fn paced(client: &Client, generator: &mut Generator) -> anyhow::Result<Vec<Duration>> {
    let per_tick = (PACED_RATE / 1000) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut latencies = Vec::with_capacity(PACED_EVENTS);
    let mut events = (0..PACED_EVENTS).map(|_| generator.next_event());
    for _ in 0..PACED_EVENTS / per_tick {
        tick.tick().await;
        for e in events.by_ref().take(per_tick) {
            let started = Instant::now();
            client.record(e).await?;
            latencies.push(started.elapsed());
        }
    }
    Ok(latencies)
}

async fn wait_stored(client: &Client, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.stats().buffered_events < n {
        anyhow::ensure!(Instant::now() < deadline, "{:?}", client.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn report(what: &str, latencies: Vec<Duration>, client: &Client) {
    report_latency(&format!("record() latency, {what}"), latencies);
    let s = client.stats();
    println!(
        "  published {} buffered {} refused {}",
        s.published_events, s.buffered_events, s.refused_events
    );
}

fn report_latency(what: &str, mut latencies: Vec<Duration>) {
    let mut l = latencies.split_off(WARM_UP);
    l.sort();
    let at = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize];
    println!(
        "{what}: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs ({} calls after {WARM_UP} warm-up)",
        micros(at(0.5)),
        micros(at(0.99)),
        micros(at(0.999)),
        micros(at(1.0)),
        l.len(),
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
