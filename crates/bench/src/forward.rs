//! `auditbridge bench`, forwarding part: how fast stored events reach RabbitMQ, next to the
//! raw limit measured in the same run (the same messages published straight to RabbitMQ with
//! lapin and publisher confirms, to the same kind of queue).
//!
//! 1. Raw limit: persistent messages, confirms in windows of 1000.
//! 2. Backlog drain, `event` mode: a backlog of stored events (an outage's worth) drained by
//!    one worker from `start: earliest`; rate and worker RSS sampled along the way.
//! 3. Backlog drain, `batch` mode: the same backlog, one NDJSON message per batch.
//! 4. Latency: events at a fixed rate through ingest and relay; a consumer on the queue stamps
//!    each arrival. Publish-to-arrival includes ingest, so it bounds commit-to-confirmed from
//!    above.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use auditbridge_config::Config;
use auditbridge_event::synth::Generator;
use auditbridge_fixtures::{AMQP_URL, Exchange, Process, QueueOptions, synthetic};
use auditbridge_sources::{Outgoing, publish_all};
use auditbridge_store::Store;
use bytes::Bytes;
use futures::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use uuid::Uuid;

use crate::{Args, Bench, STOP_GRACE, latencies, persist_synthetic, spawn_worker};

/// The benchmark's exchange and queue, and one connection to the broker for the raw limit
/// and the consumers.
pub(crate) struct Bus {
    pub(crate) exchange: Exchange,
    conn: Connection,
}

impl Bus {
    pub(crate) async fn declare(tag: &str) -> anyhow::Result<Bus> {
        // A durable queue that keeps the newest 200k messages: every message is really
        // persisted, but a million-event drain does not fill the broker's disk.
        let options = QueueOptions {
            max_length: Some(200_000),
            expires: Some(Duration::from_secs(3600)),
            ..QueueOptions::default()
        };
        let exchange = Exchange::declare(AMQP_URL, &format!("abbench.{tag}"), &options)
            .await
            .context("declaring the benchmark's exchange on RabbitMQ at 127.0.0.1:5672")?;
        let conn = exchange.connect().await?;
        Ok(Bus { exchange, conn })
    }

    pub(crate) async fn purge(&self) -> anyhow::Result<()> {
        self.exchange.purge().await?;
        Ok(())
    }

    pub(crate) async fn delete(self) {
        let _ = self.conn.close(200, "done".into()).await;
        self.exchange.delete().await;
    }

    /// A downstream consumer that takes and discards everything, as the system watching the
    /// bus would, so the queue stays short during the raw run and the drains alike (a queue
    /// at its length limit makes every publish also drop a message, which is extra broker
    /// work the raw run would not see). Runs until the returned channel is closed.
    pub(crate) async fn downstream(&self) -> anyhow::Result<Channel> {
        let channel = self.conn.create_channel().await?;
        channel
            .basic_qos(1000, lapin::options::BasicQosOptions::default())
            .await?;
        let mut consumer = self.consume(&channel, "bench-downstream").await?;
        tokio::spawn(async move { while let Some(Ok(_)) = consumer.next().await {} });
        Ok(channel)
    }

    /// A consumer of the queue on `channel`, without acks.
    async fn consume(&self, channel: &Channel, tag: &str) -> anyhow::Result<Consumer> {
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let queue = self.exchange.queue.as_str();
        Ok(channel
            .basic_consume(queue.into(), tag.into(), no_ack, FieldTable::default())
            .await?)
    }

    /// `AUDITBRIDGE_DESTINATIONS` with one destination to the bus.
    fn destination(&self, name: &str, mode: &str, start: &str) -> String {
        let params = serde_json::json!({"mode": mode, "start": start});
        serde_json::json!([self.exchange.destination(name, params)]).to_string()
    }
}

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let bus = Bus::declare(&bench.scratch.tag).await?;
    let result = run(bench, &bus).await;
    bus.delete().await;
    result
}

async fn run(bench: Bench<'_>, bus: &Bus) -> anyhow::Result<()> {
    let Bench {
        args,
        config,
        scratch,
        store,
        js,
    } = bench;
    println!(
        "forwarding: RabbitMQ, backlog {} events, latency at {}/s",
        args.backlog, args.forward_rate
    );

    // 1. Raw limit.
    let bodies: Vec<(Uuid, Bytes)> =
        synthetic(&mut Generator::new(21, args.tenants), args.raw_messages)
            .into_iter()
            .map(|(e, raw)| (e.id, raw))
            .collect();
    let downstream = bus.downstream().await?;
    let raw_rate = raw_publish(bus, &bodies).await?;
    println!(
        "raw limit     lapin publish with confirms, persistent, windows of 1000, a consumer draining: {raw_rate:>9.0} msg/s"
    );
    bus.purge().await?;
    drop(bodies);

    // A backlog, as an outage would leave it: stored events no destination has confirmed.
    let have = scratch.count_events().await? as usize;
    if have < args.backlog {
        fill_backlog(store, args.backlog - have, args.tenants).await?;
    }
    let backlog = scratch.count_events().await? as usize;

    // 2 and 3. Drains.
    for (mode, name) in [("event", "drain-event"), ("batch", "drain-batch")] {
        let dest = bus.destination(name, mode, "earliest");
        let extra = [("AUDITBRIDGE_DESTINATIONS", dest.as_str())];
        let mut worker = spawn_worker(scratch, &extra, "127.0.0.1:0")?;
        let drain = watch_drain(store, name, backlog, &worker).await;
        let peak = worker.peak_rss_kib();
        worker.stop(STOP_GRACE).await;
        bus.purge().await?;
        let d = drain?;
        let note = if mode == "event" {
            format!("({:.2} of raw; target >= 0.80)", d.rate / raw_rate)
        } else {
            "(target: at least the ingest rate)".to_owned()
        };
        println!(
            "drain {mode:<6} {backlog} events by one worker: {:>9.0} events/s {note}; first/last 10%: {:.0}/{:.0} events/s",
            d.rate, d.first_tenth_rate, d.last_tenth_rate
        );
        println!(
            "              worker RSS at 10%/50%/90%/end: {} MB; peak {:.1} MB",
            d.rss_mb
                .iter()
                .map(|m| format!("{m:.1}"))
                .collect::<Vec<_>>()
                .join("/"),
            peak.unwrap_or(0) as f64 / 1024.0
        );
    }

    let _ = downstream.close(200, "done".into()).await;

    // 4. Latency at a fixed rate, event mode, from now on (after a checkpoint, as above).
    scratch.checkpoint().await?;
    let dest = bus.destination("latency", "event", "now");
    let extra = [("AUDITBRIDGE_DESTINATIONS", dest.as_str())];
    let mut worker = spawn_worker(scratch, &extra, "127.0.0.1:0")?;
    let latency = latency_run(args, config, store, js, bus).await;
    worker.stop(STOP_GRACE).await;
    match latency? {
        Some((p50, p99, max, n)) => println!(
            "latency       publish to arrival in the queue at {}/s ({n} events): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms  (target p99 commit-to-confirmed <= 250 ms)",
            args.forward_rate
        ),
        None => println!("latency       no events arrived"),
    }
    Ok(())
}

/// Publishes every body with confirms, 1000 in flight at a time; returns messages/s.
async fn raw_publish(bus: &Bus, bodies: &[(Uuid, Bytes)]) -> anyhow::Result<f64> {
    let channel = bus.conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    for window in bodies.chunks(1000) {
        let mut confirms = Vec::with_capacity(window.len());
        for (id, body) in window {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(id.to_string().into());
            confirms.push(
                channel
                    .basic_publish(
                        bus.exchange.name.as_str().into(),
                        "raw.limit".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        body,
                        props,
                    )
                    .await?,
            );
        }
        for c in confirms {
            let confirmation = c.await?;
            if !confirmation.is_ack() {
                bail!("the broker did not ack a raw publish: {confirmation:?}");
            }
        }
    }
    let rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
    let _ = channel.close(200, "done".into()).await;
    Ok(rate)
}

/// Stores `n` more synthetic events straight through the store's writer.
async fn fill_backlog(store: &Store, n: usize, tenants: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut generator = Generator::new(33, tenants);
    let mut left = n;
    while left > 0 {
        let chunk = left.min(5_000);
        let events = synthetic(&mut generator, chunk);
        persist_synthetic(store, &events).await?;
        left -= chunk;
    }
    println!(
        "backlog       stored {n} more events in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(crate) struct Drain {
    pub(crate) rate: f64,
    first_tenth_rate: f64,
    last_tenth_rate: f64,
    rss_mb: Vec<f64>,
}

/// Watches a destination's delivered count until it reaches `total`.
pub(crate) async fn watch_drain(
    store: &Store,
    name: &str,
    total: usize,
    worker: &Process,
) -> anyhow::Result<Drain> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut started: Option<Instant> = None;
    let mut marks: Vec<(usize, Instant)> = Vec::new();
    let mut rss_mb = Vec::new();
    let mut next_rss = [0.1, 0.5, 0.9].into_iter().peekable();
    loop {
        let delivered = store
            .destinations()
            .await?
            .into_iter()
            .find(|d| d.name == name)
            .map_or(0, |d| d.delivered_total as usize);
        let now = Instant::now();
        if delivered > 0 && started.is_none() {
            started = Some(now);
        }
        marks.push((delivered, now));
        if let Some(&f) = next_rss.peek()
            && delivered as f64 >= f * total as f64
        {
            next_rss.next();
            rss_mb.push(worker.rss_kib().unwrap_or(0) as f64 / 1024.0);
        }
        if delivered >= total {
            rss_mb.push(worker.rss_kib().unwrap_or(0) as f64 / 1024.0);
            break;
        }
        if now > deadline {
            bail!("destination {name} delivered only {delivered} of {total} in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = started.context("nothing was delivered")?;
    let end = marks.last().map(|m| m.1).unwrap_or(start);
    let rate_between = |lo: f64, hi: f64| {
        let at = |f: f64| {
            marks
                .iter()
                .find(|(d, _)| *d as f64 >= f * total as f64)
                .map(|m| m.1)
                .unwrap_or(end)
        };
        let (a, b) = (at(lo), at(hi));
        (hi - lo) * total as f64 / b.duration_since(a).as_secs_f64().max(1e-3)
    };
    Ok(Drain {
        rate: total as f64 / end.duration_since(start).as_secs_f64().max(1e-3),
        first_tenth_rate: rate_between(0.0, 0.1),
        last_tenth_rate: rate_between(0.9, 1.0),
        rss_mb,
    })
}

/// Publishes at a fixed rate while a consumer on the queue stamps arrivals.
async fn latency_run(
    args: &Args,
    config: &Config,
    store: &Store,
    js: &jetstream::Context,
    bus: &Bus,
) -> anyhow::Result<Option<(f64, f64, f64, usize)>> {
    // Wait until the destination exists (its `now` is its creation) and a relay holds its
    // lease: this measures the relay at work, not the worker starting up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !store
        .destinations()
        .await?
        .iter()
        .any(|d| d.name == "latency" && d.lease_holder.is_some())
    {
        if Instant::now() > deadline {
            bail!("no relay took the latency destination's lease");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.purge().await?;
    let total = (args.forward_rate * args.forward_seconds as f64) as usize;
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let channel = bus.conn.create_channel().await?;
    let mut consumer = bus.consume(&channel, "bench-latency").await?;

    let publisher = {
        let js = js.clone();
        let sent_at = sent_at.clone();
        let prefix = config.subject_prefix.clone();
        let rate = args.forward_rate;
        let mut generator = Generator::new(44, args.tenants);
        tokio::spawn(async move {
            let messages = futures::stream::iter(0..total).map(move |_| {
                let e = generator.next_event();
                sent_at
                    .lock()
                    .expect("not poisoned")
                    .insert(e.id.to_string(), Instant::now());
                Outgoing::new(&e, &prefix, None)
            });
            publish_all(&js, messages, Some(rate)).await
        })
    };

    let mut seen = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(args.forward_seconds + 120);
    while seen.len() < total && Instant::now() < deadline {
        let next = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await;
        let Ok(Some(Ok(delivery))) = next else {
            continue;
        };
        let now = Instant::now();
        if let Some(id) = delivery.properties.message_id().as_ref()
            && let Some(t) = sent_at.lock().expect("not poisoned").get(id.as_str())
        {
            seen.push(now.duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    publisher.await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(latencies(seen))
}
