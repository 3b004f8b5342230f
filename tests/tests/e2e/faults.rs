//! Faults caused for real, one worker at a time, so these tests can run beside the others:
//! a worker killed with SIGKILL mid-stream, a worker stopped with SIGTERM under load,
//! PostgreSQL made unreachable (every connection cut, new ones refused) for one worker, and a
//! stop held up at once by the database and by a destination.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use auditbridge_tests::proxy::Proxy;
use auditbridge_tests::{PG_BASE, TestEnv, eventually};
use uuid::Uuid;

const T: Duration = Duration::from_secs(90);

/// Publishes `events` in chunks of 500, spread over roughly `over`, on a task of its own.
fn publish_in_background(
    env: &TestEnv,
    events: Vec<auditbridge_event::Event>,
    over: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let js = env.js.clone();
    let prefix = env.prefix.clone();
    let chunks = events.len().div_ceil(500).max(1) as u32;
    let pause = over / chunks;
    tokio::spawn(async move {
        for chunk in events.chunks(500) {
            let mut acks = Vec::with_capacity(chunk.len());
            for e in chunk {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", e.message_id().as_str());
                acks.push(
                    js.publish_with_headers(
                        e.subject(&prefix),
                        headers,
                        serde_json::to_vec(e)?.into(),
                    )
                    .await?,
                );
            }
            for a in acks {
                a.await?;
            }
            tokio::time::sleep(pause).await;
        }
        Ok(())
    })
}

fn ids(events: &[auditbridge_event::Event]) -> HashSet<Uuid> {
    events.iter().map(|e| e.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let events = env.events(12_000);
    let mut first = env
        .spawn_worker("a", &[("AUDITBRIDGE_BATCH_SIZE", "500")])
        .await?;
    first.wait_ready(T).await?;
    let publisher = publish_in_background(&env, events.clone(), Duration::from_secs(4));

    // Kill it once it is well into the stream, with batches in flight.
    env.wait_for_count(3_000, T).await?;
    first.signal("KILL");
    let status = first.wait_exit(Duration::from_secs(10)).await?;
    assert!(
        !status.success(),
        "SIGKILL should not look like a clean exit"
    );
    let at_kill = env.count().await?;
    assert!(
        at_kill < 12_000,
        "the kill came too late to test anything ({at_kill})"
    );

    let second = env.spawn_worker("b", &[]).await?;
    publisher.await??;
    env.wait_for_count(12_000, T).await?;
    env.wait_for_drained(T).await?;
    assert_eq!(env.stored_ids().await?, ids(&events));
    assert_eq!(
        second.metric("auditbridge_events_persisted_total").await?,
        (12_000 - at_kill) as f64,
        "the second worker stores exactly what the first had not committed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_acks_only_what_was_committed() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let events = env.events(10_000);
    let mut first = env
        .spawn_worker("a", &[("AUDITBRIDGE_BATCH_SIZE", "500")])
        .await?;
    first.wait_ready(T).await?;
    let publisher = publish_in_background(&env, events.clone(), Duration::from_secs(3));

    env.wait_for_count(2_000, T).await?;
    let asked = Instant::now();
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(20)).await?;
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
    assert!(
        asked.elapsed() < Duration::from_secs(16),
        "took {:?}",
        asked.elapsed()
    );
    assert!(first.log_text().contains("Worker stopped."));

    let _second = env.spawn_worker("b", &[]).await?;
    publisher.await??;
    env.wait_for_count(10_000, T).await?;
    env.wait_for_drained(T).await?;
    assert_eq!(env.stored_ids().await?, ids(&events));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_then_back_loses_nothing_and_the_worker_stays_up() -> anyhow::Result<()>
{
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let proxy = Proxy::start("127.0.0.1:5432".parse()?).await?;
    let via_proxy = env
        .database_url
        .replace(PG_BASE, &format!("postgres://postgres@{}", proxy.addr));
    let mut worker = env
        .spawn_worker(
            "w",
            &[
                ("AUDITBRIDGE_DATABASE_URL", &via_proxy),
                ("AUDITBRIDGE_BATCH_SIZE", "500"),
            ],
        )
        .await?;
    worker.wait_ready(T).await?;

    let events = env.events(10_000);
    let publisher = publish_in_background(&env, events.clone(), Duration::from_secs(4));
    env.wait_for_count(1_500, T).await?;

    proxy.cut();
    // The worker notices: not ready, persist failures counted, and it holds its batches.
    let what = "/readyz to report the database down";
    eventually(what, Duration::from_secs(15), async || {
        let (status, body) = worker.get("/readyz").await?;
        anyhow::ensure!(
            status == 503 && body.contains("\"database\":false"),
            "{status} {body}"
        );
        Ok(())
    })
    .await?;
    let stalled = env.count().await?;
    // The outage lasts longer than the ack wait (3 s), so JetStream redelivers what the worker
    // holds: the worst case for duplicates.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(worker.is_running(), "the worker must survive the outage");
    assert_eq!(
        env.count().await?,
        stalled,
        "nothing can be stored while the database is away"
    );
    assert!(
        worker
            .metric("auditbridge_persist_failures_total{reason=\"unavailable\"}")
            .await?
            > 0.0
    );

    proxy.restore();
    publisher.await??;
    env.wait_for_count(10_000, T).await?;
    env.wait_for_drained(T).await?;
    assert_eq!(env.stored_ids().await?, ids(&events));
    assert!(worker.is_running());
    worker.wait_ready(T).await?;
    let log = worker.log_text();
    assert!(log.contains("Cannot persist the batch"), "{log}");
    assert!(log.contains("PostgreSQL accepted the batch again"), "{log}");
    Ok(())
}

/// `AUDITBRIDGE_SHUTDOWN_TIMEOUT` bounds the whole stop, not each step of it: with the batch in
/// flight blocked in the database (the test holds a lock on `audit_events`) and the relay
/// blocked in a delivery to a destination that accepts the request and never answers, SIGTERM
/// still ends the worker within the timeout. Each step given the whole timeout (the batch,
/// then the relays, then the pools) took at least twice as long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_bounds_a_stop_held_by_the_database_and_a_destination() -> anyhow::Result<()> {
    const STOP: Duration = Duration::from_secs(3);
    let mut env = TestEnv::new().await?;
    // A destination that reads requests and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", silent.local_addr()?);
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::spawn({
        let requests = requests.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = silent.accept().await {
                let requests = requests.clone();
                held.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                        requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }));
            }
        }
    });
    let dest = serde_json::json!([{"name": "silent", "type": "http", "params": {
        "url": url, "start": "earliest", "timeout": "120s"
    }}])
    .to_string();
    let stop = format!("{}s", STOP.as_secs());
    let mut worker = env
        .spawn_worker(
            "w",
            &[
                ("AUDITBRIDGE_DESTINATIONS", &dest),
                ("AUDITBRIDGE_SHUTDOWN_TIMEOUT", &stop),
            ],
        )
        .await?;
    worker.wait_ready(T).await?;
    let first = env.events(20);
    env.publish(&first).await?;
    env.wait_for_count(20, T).await?;
    auditbridge_tests::until("the relay is inside a delivery", T, || {
        requests.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await?;

    // Block the next batch inside its transaction: COPY waits for this lock.
    let mut lock = env.pool.begin().await?;
    sqlx::query("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await?;
    let second = env.events(20);
    env.publish(&second).await?;
    // The batch has started (counted when it is taken from the batcher: from then on its write
    // is not cut by the shutdown) and a session waits for the lock. (Waiting sessions alone
    // could be the relay's backlog report.)
    eventually("the worker's batch waits for the lock", T, async || {
        let received = worker.metric("auditbridge_events_received_total").await?;
        anyhow::ensure!(received >= 40.0, "{received} messages taken into batches");
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&env.pool)
        .await?;
        anyhow::ensure!(waiting > 0, "no session waits for a lock yet");
        Ok(())
    })
    .await?;

    let started = Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30)).await?;
    let took = started.elapsed();
    lock.rollback().await?;
    listener.abort();
    assert!(
        status.success(),
        "the worker exits 0 after a stop cut short: {status}"
    );
    assert!(
        took < STOP + Duration::from_secs(2),
        "the stop took {took:?} with AUDITBRIDGE_SHUTDOWN_TIMEOUT={stop}: {}",
        worker.log_text()
    );
    assert!(
        worker.log_text().contains("Gave up on a step of the stop"),
        "the step cut at the deadline is named: {}",
        worker.log_text()
    );
    // What was abandoned is redelivered to the next worker and stored once.
    let next = env.spawn_worker("next", &[]).await?;
    env.wait_for_count(40, T).await?;
    let stored = env.stored_ids().await?;
    assert!(second.iter().all(|e| stored.contains(&e.id)));
    drop(next);
    Ok(())
}
