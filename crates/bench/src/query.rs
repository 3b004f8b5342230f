//! `auditbridge bench --only query`: the query API over a large trail, next to the raw limit
//! measured in the same run (the same page query sent straight to PostgreSQL, without HTTP or
//! JSON).
//!
//! 1. Load: N synthetic events (default 5,000,000 across 50 tenants, `occurred_at` spread over
//!    30 days) through the store's batch writer, then ANALYZE and CHECKPOINT.
//! 2. Pages: for the common filters on the largest tenant, the latency of a first page of 100
//!    and of a deep page (a cursor 100,000 rows in), over HTTP from a client on the same
//!    machine, sequentially; and the same first-page query run directly (the raw limit).
//! 3. Live tail: an SSE client follows every tenant while events are written as fast as the
//!    store takes them; the tail's delivery rate is printed next to the write rate.

use auditbridge_config::Scope;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use auditbridge_event::synth::Generator;
use auditbridge_fixtures::{Scratch, synthetic};
use auditbridge_store::{EventFilter, Order, PageQuery, Store};
use time::format_description::well_known::Rfc3339;

use crate::{Args, Bench, BenchApi, persist_synthetic};

/// Requests per latency figure.
const SAMPLES: usize = 200;

pub(crate) async fn measure(bench: Bench<'_>) -> anyhow::Result<()> {
    let Bench {
        args,
        config,
        scratch,
        store,
        ..
    } = bench;
    println!(
        "auditbridge bench, query: {} stored events, {} tenants",
        args.query_events, args.tenants
    );
    load(scratch, store, args.query_events, args.tenants).await?;
    scratch.analyze().await?;
    let partitions = store.retention_status().await?.partitions;
    println!(
        "partitions    the events are in {} partitions of audit_events ({} in all, interval {}s)",
        partitions.iter().filter(|p| p.tenants > 0).count(),
        partitions.len(),
        args.partition_interval.as_secs()
    );

    let api = BenchApi::start(config, &[Scope::Read]).await?;
    let http = reqwest::Client::new();
    let client = Client {
        http: &http,
        base: &api.base,
        token: &api.token,
    };

    let result = async {
        let sample = scratch.sample().await?;
        println!(
            "data          largest tenant {:?}: {} events; filters use its most frequent actor {:?}, target {:?}, top-level action {:?}",
            sample.tenant, sample.tenant_events, sample.actor, sample.target, sample.action
        );
        let day_end = sample.newest;
        let day_start = day_end - time::Duration::days(1);
        let filters: Vec<(&str, String, EventFilter)> = {
            let base = EventFilter {
                tenant: Some(sample.tenant.clone()),
                ..EventFilter::default()
            };
            let with = |f: &dyn Fn(&mut EventFilter)| {
                let mut e = base.clone();
                f(&mut e);
                e
            };
            vec![
                ("tenant only", String::new(), base.clone()),
                (
                    "action prefix",
                    format!("&action={}", sample.action),
                    with(&|f| f.action.include = vec![sample.action.clone()]),
                ),
                (
                    "actor",
                    format!("&actor={}", sample.actor),
                    with(&|f| f.actor.include = vec![sample.actor.clone()]),
                ),
                (
                    "target",
                    format!("&target={}", sample.target),
                    with(&|f| f.target.include = vec![sample.target.clone()]),
                ),
                (
                    "outcome",
                    "&outcome=denied,failure".into(),
                    with(&|f| f.outcome.include = vec!["denied".into(), "failure".into()]),
                ),
                (
                    "last day",
                    format!(
                        "&since={}&until={}",
                        day_start.format(&Rfc3339)?,
                        day_end.format(&Rfc3339)?
                    ),
                    with(&|f| {
                        f.since = Some(day_start);
                        f.until = Some(day_end);
                    }),
                ),
            ]
        };
        println!(
            "pages         {SAMPLES} sequential requests each, page of 100, newest first; raw = the same query straight to PostgreSQL  (target p99 <= 50 ms)"
        );
        for (name, query, filter) in &filters {
            let path = format!("/v1/events?tenant={}{query}&limit=100", sample.tenant);
            let first = client.latencies(&path, SAMPLES).await?;
            let raw = raw_latencies(store, filter, SAMPLES).await?;
            let (deep_cursor, depth) = client.walk(&path, 100_000).await?;
            let deep = match &deep_cursor {
                Some(c) => Some(
                    client
                        .latencies(&format!("{path}&cursor={c}"), SAMPLES)
                        .await?,
                ),
                None => None,
            };
            println!(
                "  {name:<14} first page p50 {:>5.1} ms p99 {:>5.1} ms | raw p50 {:>5.1} ms p99 {:>5.1} ms | {}",
                first.quantile(0.5),
                first.quantile(0.99),
                raw.quantile(0.5),
                raw.quantile(0.99),
                match deep {
                    Some(d) => format!(
                        "deep page (after {depth} rows) p50 {:>5.1} ms p99 {:>5.1} ms",
                        d.quantile(0.5),
                        d.quantile(0.99)
                    ),
                    None => format!("only {depth} rows match: no page 100,000 deep"),
                }
            );
        }
        tail_run(store, &client, args).await
    }
    .await;
    api.stop().await;
    result
}

/// Stores `n` synthetic events, `occurred_at` spread over the last 30 days, with two writers.
pub(crate) async fn load(
    scratch: &Scratch,
    store: &Store,
    n: usize,
    tenants: usize,
) -> anyhow::Result<()> {
    let existing = scratch.count_events().await? as usize;
    if existing >= n {
        println!("load          {existing} events already stored (--keep'd database)");
        return Ok(());
    }
    let started = Instant::now();
    let span_ms: i64 = 30 * 86_400 * 1000;
    let now = time::OffsetDateTime::now_utc();
    let writers = 2;
    let per_writer = (n - existing).div_ceil(writers);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut generator = Generator::new(1000 + w as u64, tenants);
            let mut done = 0usize;
            while done < per_writer {
                let chunk = (per_writer - done).min(5_000);
                let mut events = synthetic(&mut generator, chunk);
                for (i, (e, raw)) in events.iter_mut().enumerate() {
                    // Oldest first, so the trail grows in time as it would have.
                    let k = (done + i) as i64 * writers as i64 + w as i64;
                    let back = span_ms - span_ms * k / (per_writer as i64 * writers as i64);
                    e.occurred_at = now - time::Duration::milliseconds(back);
                    *raw = serde_json::to_vec(e)?.into();
                }
                persist_synthetic(&store, &events).await?;
                done += chunk;
                if w == 0 && (done / chunk).is_multiple_of(100) {
                    println!(
                        "load          {} events stored, {:.0} events/s",
                        existing + done * writers,
                        (done * writers) as f64 / started.elapsed().as_secs_f64()
                    );
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let stored = scratch.count_events().await?;
    println!(
        "load          {stored} events stored in {:.0}s ({:.0} events/s)",
        started.elapsed().as_secs_f64(),
        (stored as usize - existing) as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Client<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    token: &'a str,
}

impl Client<'_> {
    async fn get(&self, path: &str) -> anyhow::Result<bytes::Bytes> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.token)
            .send()
            .await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            bail!("{path}: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }

    /// Milliseconds per request, until the whole body arrived.
    async fn latencies(&self, path: &str, n: usize) -> anyhow::Result<Samples> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            self.get(path).await?;
            out.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(Samples(out))
    }

    /// Pages through `depth` rows (1000 at a time); the cursor there, and the rows passed.
    async fn walk(&self, path: &str, depth: usize) -> anyhow::Result<(Option<String>, usize)> {
        let base = path.replace("&limit=100", "&limit=1000");
        let mut cursor: Option<String> = None;
        let mut passed = 0usize;
        while passed < depth {
            let url = match &cursor {
                Some(c) => format!("{base}&cursor={c}"),
                None => base.clone(),
            };
            let page: serde_json::Value = serde_json::from_slice(&self.get(&url).await?)?;
            passed += page["events"].as_array().map_or(0, Vec::len);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok((None, passed)),
            }
        }
        Ok((cursor, passed))
    }
}

async fn raw_latencies(store: &Store, filter: &EventFilter, n: usize) -> anyhow::Result<Samples> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        store
            .page(&PageQuery {
                filter: filter.clone(),
                order: Order::Desc,
                after: None,
                limit: 101,
            })
            .await?;
        out.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Samples(out))
}

struct Samples(Vec<f64>);

impl Samples {
    fn quantile(&self, q: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
    }
}

/// An all-tenant live tail while events are written as fast as the store takes them.
async fn tail_run(store: &Store, client: &Client<'_>, args: &Args) -> anyhow::Result<()> {
    let n = args.tail_events;
    let mut resp = client
        .http
        .get(format!("{}/v1/events/stream", client.base))
        .bearer_auth(client.token)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("stream: {}", resp.status());
    }
    // Wait for the end of the (empty) replay.
    let mut buf = String::new();
    while !buf.contains("event: caught-up") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .context("no caught-up from the stream")??
            .context("stream ended")?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    let started = Instant::now();
    let writer = {
        let store = store.clone();
        let tenants = args.tenants;
        tokio::spawn(async move {
            let mut generator = Generator::new(99, tenants);
            let mut left = n;
            while left > 0 {
                let chunk = left.min(2_000);
                let events = synthetic(&mut generator, chunk);
                persist_synthetic(&store, &events).await?;
                left -= chunk;
            }
            anyhow::Ok(started.elapsed())
        })
    };
    let mut received = 0usize;
    let mut tail_buf: Vec<u8> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while received < n {
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .context("the tail stalled")??
            .context("the tail ended")?;
        tail_buf.extend_from_slice(&chunk);
        // Count complete events; keep the unfinished tail of the buffer.
        let text = String::from_utf8_lossy(&tail_buf).into_owned();
        let cut = text.rfind("\n\n").map_or(0, |i| i + 2);
        received += text[..cut].matches("event: audit").count();
        tail_buf.drain(..cut);
        if Instant::now() > deadline {
            bail!("the tail delivered {received} of {n} events in 10 minutes");
        }
    }
    let tail_elapsed = started.elapsed();
    let write_elapsed = writer.await??;
    println!(
        "live tail     {n} events written at {:>7.0} events/s; an all-tenant SSE client received them at {:>7.0} events/s, the last {:.0} ms after the last write  (target: keeps up with ingest)",
        n as f64 / write_elapsed.as_secs_f64(),
        n as f64 / tail_elapsed.as_secs_f64(),
        (tail_elapsed.as_secs_f64() - write_elapsed.as_secs_f64()).max(0.0) * 1000.0
    );
    Ok(())
}
