//! Faults caused for real, one worker at a time, so these tests can run beside the others:
//! a worker killed with SIGKILL mid-stream, a worker stopped with SIGTERM under load, and
//! PostgreSQL made unreachable (every connection cut, new ones refused) for one worker.

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
