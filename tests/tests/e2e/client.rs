//! The producer client (`auditbridge-client`) against real NATS, PostgreSQL and the real
//! worker. NATS outages use a private `nats-server` (killed with SIGKILL and started again on
//! the same port and store directory), never the shared one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream;
use auditbridge_client::{
    Backpressure, Client, ClientBuilder, EventBuilder, FileParams, MemoryParams, OnFull, Outcome,
    PostgresParams, RecordError, StoreConfig,
};
use auditbridge_event::{Event, Uuid};
use auditbridge_tests::nats_server::NatsServer;
use auditbridge_tests::{PG_BASE, TestEnv, eventually};
use sqlx::migrate::MigrateDatabase as _;

const EVENTS_PER_PHASE: usize = 400;

fn builder(env: &TestEnv, nats_url: &str, store: StoreConfig) -> ClientBuilder {
    Client::builder()
        .nats_url(nats_url)
        .subject_prefix(&env.prefix)
        .source("client-test")
        .store(store)
        .ack_timeout(Duration::from_secs(2))
        .spill_after(Duration::from_millis(500))
}

fn make(i: usize) -> Event {
    EventBuilder::new(format!("tenant-{}", i % 3), "document.update")
        .source("client-test")
        .actor(format!("u-{i}"))
        .target(format!("doc-{i}"))
        .outcome(Outcome::Success)
        .meta("i", i)
        .build()
        .expect("a valid event")
}

/// Records `n` events, 1 ms apart (a service handling requests), and fails on any refusal.
async fn record_paced(
    client: &Client,
    from: usize,
    n: usize,
    ids: &mut Vec<Uuid>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for i in from..from + n {
        tick.tick().await;
        let e = make(i);
        ids.push(e.id);
        client
            .record(e)
            .await
            .with_context(|| format!("record #{i} was refused"))?;
    }
    Ok(())
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("ab-client-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The ids in the stream, in stream order, first occurrences only.
async fn stream_ids(nats_url: &str, stream: &str) -> anyhow::Result<Vec<Uuid>> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let mut stream = js.get_stream(stream).await?;
    let info = stream.info().await?.clone();
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let message = stream.get_raw_message(seq).await?;
        let event = auditbridge_event::decode(&message.payload, 1 << 20)?;
        if seen.insert(event.id) {
            ids.push(event.id);
        }
    }
    Ok(ids)
}

/// A service records a burst at a steady pace; NATS is killed in the middle of it and comes
/// back later. Every event must land in PostgreSQL, through the real worker, exactly once,
/// and reach the stream in the order it was recorded.
async fn outage_during_burst(store: StoreConfig) -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut nats = NatsServer::start().await?;
    let url = nats.url();
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_NATS_URL", &url)])
        .await?;
    worker.wait_ready(Duration::from_secs(30)).await?;
    let client = builder(&env, &url, store).connect().await?;

    let mut ids = Vec::new();
    record_paced(&client, 0, EVENTS_PER_PHASE, &mut ids).await?;
    nats.kill().await?;
    record_paced(&client, EVENTS_PER_PHASE, EVENTS_PER_PHASE, &mut ids).await?;
    let during = client.stats();
    ensure!(
        during.buffered_events > 0 && during.store_events > 0,
        "events recorded while NATS was down must be in the store: {during:?}"
    );
    nats.restart().await?;
    record_paced(&client, 2 * EVENTS_PER_PHASE, EVENTS_PER_PHASE, &mut ids).await?;

    client
        .flush(Duration::from_secs(30))
        .await
        .with_context(|| format!("flush: {:?}", client.stats()))?;
    let stats = client.stats();
    ensure!(
        stats.store_events == 0 && stats.refused_events == 0,
        "{stats:?}"
    );
    ensure!(stats.drained_events >= during.buffered_events, "{stats:?}");
    client.close(Duration::from_secs(5)).await?;

    let n = ids.len() as i64;
    env.wait_for_count(n, Duration::from_secs(60))
        .await
        .with_context(|| format!("worker log: {}", worker.log.display()))?;
    let stored = env.stored_ids().await?;
    let recorded: HashSet<Uuid> = ids.iter().copied().collect();
    ensure!(
        stored == recorded,
        "{} recorded events missing, {} unexpected",
        recorded.difference(&stored).count(),
        stored.difference(&recorded).count()
    );
    // Buffered events drain before newer ones are published: the stream holds them in
    // record order. The exception is the handful handed to the NATS client just before the
    // kill: the client re-sends its unsent buffer after reconnecting, while the same events
    // also drain from the store. A store that reordered its backlog would move events by
    // hundreds of places (the outage lasts 400 events).
    let in_stream = stream_ids(&url, &env.stream).await?;
    ensure!(
        in_stream.len() == ids.len(),
        "{} in the stream",
        in_stream.len()
    );
    let position: std::collections::HashMap<Uuid, usize> = in_stream
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i))
        .collect();
    let moved = ids
        .iter()
        .enumerate()
        .map(|(i, id)| position[id].abs_diff(i))
        .max()
        .unwrap_or(0);
    println!("largest move from record order in the stream: {moved} places");
    ensure!(
        moved <= 50,
        "an event is {moved} places away from its record order"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_during_a_burst_loses_nothing_with_the_memory_store() -> anyhow::Result<()> {
    outage_during_burst(StoreConfig::Memory(MemoryParams::default())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_during_a_burst_loses_nothing_with_the_file_store() -> anyhow::Result<()> {
    let dir = TempDir::new();
    let mut params = FileParams::new(dir.path());
    // Small segments, so the outage's backlog spans several and rotation is exercised.
    params.segment_bytes = 64 * 1024;
    outage_during_burst(StoreConfig::File(params)).await?;
    let left: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .collect();
    ensure!(
        left == [0],
        "a drained file store keeps one empty segment: {left:?}"
    );
    Ok(())
}

/// The producer's own database for the postgres store; dropped at the end.
struct ProducerDb {
    url: String,
}

impl ProducerDb {
    async fn create() -> anyhow::Result<ProducerDb> {
        let url = format!(
            "{PG_BASE}/ab_client_{}",
            &Uuid::now_v7().simple().to_string()[18..]
        );
        sqlx::Postgres::create_database(&url).await?;
        Ok(ProducerDb { url })
    }
}

impl Drop for ProducerDb {
    fn drop(&mut self) {
        let url = self.url.clone();
        auditbridge_tests::run_cleanup(async move {
            let _ = auditbridge_store::drop_database(&url).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_during_a_burst_loses_nothing_with_the_postgres_store() -> anyhow::Result<()> {
    let db = ProducerDb::create().await?;
    let params = PostgresParams::new(db.url.as_str());
    outage_during_burst(StoreConfig::Postgres(params)).await?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM auditbridge_client_buffer")
        .fetch_one(&pool)
        .await?;
    ensure!(rows == 0, "{rows} rows left in the producer's table");
    pool.close().await;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `record` costs the same whether NATS is up or down: it never does I/O on the caller's
/// task (the file store is written by the background task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_latency_stays_flat_while_nats_is_down() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut nats = NatsServer::start().await?;
    let url = nats.url();
    let js = jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(jetstream::stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.prefix)],
        ..Default::default()
    })
    .await?;
    let dir = TempDir::new();
    let client = builder(&env, &url, StoreConfig::File(FileParams::new(dir.path())))
        .connect()
        .await?;

    let measure = |client: Client| async move {
        let mut tick = tokio::time::interval(Duration::from_micros(500));
        let mut latencies = Vec::with_capacity(2000);
        for i in 0..2000 {
            tick.tick().await;
            let e = make(i);
            let started = Instant::now();
            client.record(e).await?;
            latencies.push(started.elapsed());
        }
        latencies.sort();
        anyhow::Ok(latencies)
    };
    let up = measure(client.clone()).await?;
    nats.kill().await?;
    let down = measure(client.clone()).await?;
    let (up50, down50) = (percentile(&up, 0.5), percentile(&down, 0.5));
    let (up99, down99) = (percentile(&up, 0.99), percentile(&down, 0.99));
    println!(
        "record() latency: NATS up p50 {up50:?} p99 {up99:?}; NATS down (file store) p50 {down50:?} p99 {down99:?}"
    );
    let stats = client.stats();
    ensure!(
        stats.buffered_events > 0,
        "the store was not used: {stats:?}"
    );
    // Bounds loose enough for a debug build on a shared 2-core machine, tight enough to catch
    // a write (let alone an fsync, about a millisecond here) on the caller's path.
    ensure!(
        down50 <= up50 * 2 + Duration::from_micros(20),
        "p50 with NATS down {down50:?} vs up {up50:?}"
    );
    ensure!(
        down99 <= up99 * 3 + Duration::from_millis(1),
        "p99 with NATS down {down99:?} vs up {up99:?}"
    );

    nats.restart().await?;
    client.flush(Duration::from_secs(30)).await?;
    client.close(Duration::from_secs(5)).await?;
    Ok(())
}

/// With NATS unreachable and a small store, the client fills up and says so — at once with
/// `OnFull::Error`, after the wait with `OnFull::Wait` — and every event it accepted arrives
/// once NATS is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_explicitly_and_loses_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut nats = NatsServer::start().await?;
    let url = nats.url();
    nats.kill().await?;
    let small = || {
        StoreConfig::Memory(MemoryParams {
            max_events: 50,
            max_bytes: 1 << 20,
        })
    };
    let tight = |b: ClientBuilder| b.queue_capacity(10).max_in_flight(8).drain_batch(8);
    let refusing = tight(builder(&env, &url, small())).connect().await?;
    let waiting = tight(builder(&env, &url, small()))
        .on_full(OnFull::Wait(Duration::from_millis(300)))
        .connect()
        .await?;

    // Events arrive faster than the background task stores them at first (`Busy`); a real
    // service would retry later, so does this loop. It ends at the first `StoreFull`.
    let mut accepted = Vec::new();
    let mut busy = 0;
    let mut store_full = None;
    for i in 0..500 {
        let e = make(i);
        let id = e.id;
        match refusing.record(e).await {
            Ok(()) => accepted.push(id),
            Err(RecordError::Full {
                cause: Backpressure::Busy,
                waited,
            }) => {
                ensure!(waited == Duration::ZERO, "OnFull::Error does not wait");
                busy += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(RecordError::Full {
                cause: Backpressure::StoreFull,
                waited,
            }) => {
                store_full = Some(waited);
                break;
            }
            Err(other) => bail!("unexpected refusal: {other}"),
        }
    }
    ensure!(
        store_full == Some(Duration::ZERO),
        "expected StoreFull at once after at most 50 + queue + held events; accepted {}",
        accepted.len()
    );
    // The store's 50, the queue's 10 and at most 16 held by the background task.
    ensure!(
        (50..=50 + 10 + 16).contains(&accepted.len()),
        "{}",
        accepted.len()
    );
    let stats = refusing.stats();
    ensure!(
        stats.store_events == 50 && stats.refused_events == busy + 1,
        "{stats:?}"
    );

    let mut waiting_accepted = 0;
    let refusal = loop {
        let e = make(waiting_accepted);
        let started = Instant::now();
        match waiting.record(e.clone()).await {
            Ok(()) => {
                accepted.push(e.id);
                waiting_accepted += 1;
                ensure!(waiting_accepted < 500, "never became full");
            }
            Err(err) => break (err, started.elapsed()),
        }
    };
    let (RecordError::Full { waited, .. }, elapsed) = refusal else {
        bail!("expected Full, got {:?}", refusal.0);
    };
    ensure!(
        waited >= Duration::from_millis(300) && elapsed >= Duration::from_millis(300),
        "OnFull::Wait waits before refusing: {waited:?}"
    );

    // NATS comes back: both stores drain and record works again.
    nats.restart().await?;
    let js = jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(jetstream::stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.prefix)],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    for client in [&refusing, &waiting] {
        client.flush(Duration::from_secs(30)).await?;
        let e = make(2000);
        accepted.push(e.id);
        client.record(e).await?;
        client.close(Duration::from_secs(10)).await?;
    }
    let in_stream: HashSet<Uuid> = stream_ids(&url, &env.stream).await?.into_iter().collect();
    let accepted: HashSet<Uuid> = accepted.into_iter().collect();
    ensure!(
        in_stream == accepted,
        "every accepted event, and nothing else, is in the stream ({} accepted, {} in the stream)",
        accepted.len(),
        in_stream.len()
    );
    Ok(())
}

/// A file store left by an earlier run, with corrupt lines among valid events: the corrupt
/// lines go to the dead-letter file with their reason, and every valid event reaches
/// PostgreSQL through the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_file_segment_is_dead_lettered_and_the_rest_is_delivered() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.spawn_worker("w", &[]).await?;
    worker.wait_ready(Duration::from_secs(30)).await?;
    let dir = TempDir::new();

    let mut lines = Vec::new();
    let mut ids = HashSet::new();
    for i in 0..30 {
        let e = make(i);
        ids.insert(e.id);
        lines.push(serde_json::to_string(&e)?);
        match i {
            5 => lines.push(r#"{"id": "0192f7a4-6b1e-7c3d-9a2b-5f1e2"#.to_owned()), // torn
            12 => lines.push("\u{0}\u{1}binary garbage".to_owned()),
            20 => {
                let mut bad = serde_json::to_value(make(99))?;
                bad["tenant"] = "Not-A-Tenant".into();
                lines.push(bad.to_string());
            }
            _ => {}
        }
    }
    std::fs::write(
        dir.path().join(format!("{:020}.jsonl", 1)),
        lines.join("\n") + "\n",
    )?;

    let client = builder(
        &env,
        auditbridge_tests::NATS_URL,
        StoreConfig::File(FileParams::new(dir.path())),
    )
    .connect()
    .await?;
    client.flush(Duration::from_secs(30)).await?;
    let stats = client.stats();
    ensure!(
        stats.dead_lettered_events == 3 && stats.drained_events == 30,
        "{stats:?}"
    );
    client.close(Duration::from_secs(5)).await?;

    env.wait_for_count(30, Duration::from_secs(30)).await?;
    ensure!(env.stored_ids().await? == ids);
    let dead = std::fs::read_to_string(dir.path().join("dead-letters.jsonl"))?;
    let dead: Vec<serde_json::Value> = dead
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(dead.len() == 3, "{dead:?}");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or(""))
        .collect();
    ensure!(reasons[0].contains("not valid JSON"), "{reasons:?}");
    ensure!(reasons[2].starts_with("tenant: expected"), "{reasons:?}");
    ensure!(
        dead[1]["line"]
            .as_str()
            .is_some_and(|l| l.contains("binary garbage"))
    );
    Ok(())
}

/// JetStream's duplicate window is per stream: a producer of tenant `globex` that records an
/// event with the id a tenant `acme` event will carry, first, must not have the `acme` event
/// dropped as a duplicate before any worker sees it (the message id is `<tenant>:<id>`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_event_with_the_same_id_does_not_suppress_it() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let store = StoreConfig::Memory(MemoryParams {
        max_events: 100,
        max_bytes: 1 << 20,
    });
    let client = builder(&env, auditbridge_tests::NATS_URL, store)
        .connect()
        .await?;
    let victim = EventBuilder::new("acme", "document.update")
        .source("client-test")
        .actor("u-1")
        .outcome(Outcome::Success)
        .build()?;
    let squatter = EventBuilder::new("globex", "document.update")
        .id(victim.id)
        .source("client-test")
        .actor("mallory")
        .outcome(Outcome::Success)
        .build()?;
    client.record(squatter).await?;
    client.flush(Duration::from_secs(10)).await?;
    client.record(victim.clone()).await?;
    client.flush(Duration::from_secs(10)).await?;
    client.close(Duration::from_secs(5)).await?;

    let js = jetstream::new(async_nats::connect(auditbridge_tests::NATS_URL).await?);
    let mut stream = js.get_stream(&env.stream).await?;
    let state = stream.info().await?.state.clone();
    ensure!(
        state.messages == 2,
        "{} messages in the stream: the acme event was dropped as a duplicate of globex's",
        state.messages
    );
    let last = stream.get_raw_message(state.last_sequence).await?;
    let stored = auditbridge_event::decode(&last.payload, 1 << 20)?;
    assert_eq!((stored.tenant.as_str(), stored.id), ("acme", victim.id));
    Ok(())
}

/// More events held in memory than `max_in_flight` (the store takes none of them: it is
/// full) go out directly once NATS is back, at most `max_in_flight` at a time. This used to
/// underflow `max_in_flight - in_flight` in the background task (a panic in a debug build:
/// every event it held lost; a wrapped "room" in a release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_held_events_than_max_in_flight_go_out_when_nats_is_back() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut nats = NatsServer::start().await?;
    let url = nats.url();
    let js = jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(jetstream::stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.prefix)],
        ..Default::default()
    })
    .await?;
    nats.kill().await?;
    // A store that refuses every event (1 byte), so everything taken stays held: up to
    // twice the larger of max_in_flight and drain_batch, 16 here, eight times max_in_flight.
    let full = StoreConfig::Memory(MemoryParams {
        max_events: 1,
        max_bytes: 1,
    });
    let client = builder(&env, &url, full)
        .max_in_flight(2)
        .drain_batch(8)
        .connect()
        .await?;
    let mut ids = Vec::new();
    for i in 0..40 {
        let e = make(i);
        ids.push(e.id);
        client.record(e).await?;
    }
    eventually(
        "the rest held in the queue",
        Duration::from_secs(10),
        async || {
            let stats = client.stats();
            ensure!(stats.queue_events <= 40 - 16, "not held: {stats:?}");
            Ok(())
        },
    )
    .await?;
    ensure!(client.stats().store_events == 0, "{:?}", client.stats());

    nats.restart().await?;
    client
        .flush(Duration::from_secs(30))
        .await
        .with_context(|| format!("flush: {:?}", client.stats()))?;
    client.close(Duration::from_secs(5)).await?;
    let in_stream = stream_ids(&url, &env.stream).await?;
    ensure!(
        in_stream == ids,
        "every event once, in record order: {} of {} in the stream",
        in_stream.len(),
        ids.len()
    );
    Ok(())
}

/// Rows of the postgres store that no longer decode (altered in the table), a whole drain
/// batch of them: they move to `<table>_dead`, the good rows behind them still drain, and no
/// transaction of the store stays open. One left open would hold back the xmin horizon of
/// every database in the cluster, and with it every relay and live tail of a trail there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_rows_of_the_postgres_store_are_moved_and_leave_no_transaction_open()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let db = ProducerDb::create().await?;
    let store = StoreConfig::Postgres(PostgresParams::new(db.url.as_str()));
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let database = db.url.rsplit('/').next().unwrap_or_default().to_owned();

    // NATS unreachable: the first client creates the table; five corrupt rows come first,
    // then three good events, which it stores.
    let closed = format!("nats://{}", auditbridge_tests::free_addr()?);
    let offline = builder(&env, &closed, store.clone())
        .drain_batch(4)
        .connect()
        .await?;
    for i in 0..5 {
        sqlx::query(
            "INSERT INTO auditbridge_client_buffer (id, subject, payload) VALUES ($1, 'x', $2)",
        )
        .bind(Uuid::now_v7())
        .bind(format!("{{\"not\": \"an event {i}\"}}").into_bytes())
        .execute(&pool)
        .await?;
    }
    let good: Vec<Event> = (0..3).map(make).collect();
    for e in &good {
        offline.record(e.clone()).await?;
    }
    let err = offline.close(Duration::from_secs(2)).await.unwrap_err();
    ensure!(
        matches!(
            err,
            auditbridge_client::CloseError::Unpublished { events: 3, .. }
        ),
        "{err}"
    );

    // With NATS there, the first drain batch (4) is nothing but corrupt rows.
    let online = builder(&env, auditbridge_tests::NATS_URL, store)
        .drain_batch(4)
        .connect()
        .await?;
    let want: Vec<Uuid> = good.iter().map(|e| e.id).collect();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    // The client deletes what it drained after JetStream acknowledged it: the rows leave the
    // buffer a moment after the events reach the stream.
    let what = "the good rows behind the corrupt ones drained and left the buffer";
    eventually(what, Duration::from_secs(20), async || {
        // Reading an empty stream is an error: nothing there yet.
        let in_stream = stream_ids(auditbridge_tests::NATS_URL, &env.stream).await;
        ensure!(
            in_stream.is_ok_and(|ids| ids == want),
            "not drained: {:?}",
            online.stats()
        );
        ensure!(count("SELECT count(*) FROM auditbridge_client_buffer").await? == 0);
        Ok(())
    })
    .await?;
    ensure!(count("SELECT count(*) FROM auditbridge_client_buffer_dead").await? == 5);
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM auditbridge_client_buffer_dead ORDER BY seq LIMIT 1",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(reason.contains("unknown field"), "{reason}");

    // The client is still running: none of its sessions is inside a transaction.
    let sessions: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT application_name, coalesce(state, ''), backend_xid IS NOT NULL OR backend_xmin IS NOT NULL \
         FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&database)
    .fetch_all(&pool)
    .await?;
    let store_sessions: Vec<_> = sessions
        .iter()
        .filter(|(app, _, _)| app == "auditbridge-client")
        .collect();
    ensure!(!store_sessions.is_empty(), "{sessions:?}");
    ensure!(
        store_sessions
            .iter()
            .all(|(_, state, holds)| state == "idle" && !holds),
        "a session of the store holds a transaction: {sessions:?}"
    );
    let stats = online.stats();
    ensure!(stats.dead_lettered_events == 5, "{stats:?}");
    online.close(Duration::from_secs(5)).await?;
    pool.close().await;
    Ok(())
}

/// A NATS server that requires a user and password, given in the URLs (as operators write
/// them): the worker (logging at debug level) and the client both authenticate with them,
/// and the password never appears in the worker's log nor in the client builder's `Debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_nats_url_authenticates_and_never_reaches_a_log() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let port = auditbridge_tests::free_addr()?.port();
    let dir = TempDir::new();
    let password = format!("pw-{}", Uuid::now_v7().simple());
    let mut server = tokio::process::Command::new(auditbridge_tests::nats_server::NATS_SERVER)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path().join("js"))
        .args(["--user", "ab", "--pass", &password])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("nats://ab:{password}@127.0.0.1:{port}");
    let worker = env
        .spawn_worker(
            "w",
            &[("AUDITBRIDGE_NATS_URL", &url), ("AUDITBRIDGE_LOG", "debug")],
        )
        .await?;
    worker
        .wait_ready(Duration::from_secs(30))
        .await
        .with_context(|| format!("worker log: {}", worker.log.display()))?;

    let builder = builder(&env, &url, StoreConfig::Memory(MemoryParams::default()));
    let shown = format!("{builder:?}");
    ensure!(
        !shown.contains(&password) && shown.contains("ab:***@127.0.0.1"),
        "{shown}"
    );
    let client = builder.connect().await?;
    let e = make(0);
    client.record(e.clone()).await?;
    client.flush(Duration::from_secs(20)).await?;
    client.close(Duration::from_secs(5)).await?;
    env.wait_for_count(1, Duration::from_secs(30)).await?;
    ensure!(env.stored_ids().await?.contains(&e.id));

    let log = worker.log_text();
    ensure!(log.contains("DEBUG"), "the worker logged at debug level");
    ensure!(
        !log.contains(&password),
        "the NATS password is in the worker's log: {}",
        worker.log.display()
    );
    let _ = server.start_kill();
    Ok(())
}
