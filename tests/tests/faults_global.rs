//! Faults that touch the shared services themselves. Cargo runs test binaries one after
//! another, so nothing else runs while these do; within this binary a lock keeps them apart.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use auditbridge_tests::TestEnv;
use auditbridge_tests::rabbit::TestBroker;
use tokio::sync::Mutex;

const T: Duration = Duration::from_secs(120);
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Restarts the local PostgreSQL cluster (as root, the way the machine starts it).
fn restart_postgres() -> anyhow::Result<()> {
    let version = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .ok_or_else(|| anyhow::anyhow!("no cluster under /etc/postgresql"))?;
    let status = std::process::Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "fast",
        ])
        .status()?;
    anyhow::ensure!(status.success(), "pg_ctlcluster restart failed: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_during_load_loses_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let mut worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_BATCH_SIZE", "500")])
        .await?;
    worker.wait_ready(T).await?;
    let events = env.events(10_000);

    let (first, second) = events.split_at(4_000);
    env.publish(first).await?;
    env.wait_for_count(2_000, T).await?;
    // The restart severs every connection, including the test's own pool.
    restart_postgres()?;
    env.publish(second).await?;

    // (A count that fails while the server restarts is tried again.)
    env.wait_for_count(10_000, T).await?;
    env.wait_for_drained(T).await?;
    assert_eq!(
        env.stored_ids().await?,
        events.iter().map(|e| e.id).collect::<HashSet<_>>()
    );
    assert!(worker.is_running(), "the worker must ride out the restart");
    // The restart really reached the worker: at least one batch failed and was retried.
    assert!(
        worker
            .metric("auditbridge_persist_failures_total{reason=\"unavailable\"}")
            .await?
            > 0.0,
        "the restart did not interrupt the worker; log: {}",
        worker.log.display()
    );
    Ok(())
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Starts the broker again however the test ends.
struct StartAgain;
impl Drop for StartAgain {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
        let _ = rabbitmqctl(&["await_startup", "--timeout", "60"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_outage_during_load_costs_delay_not_events() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let broker = TestBroker::new(&env.tag).await?;
    let dest = serde_json::json!([broker.destination(
        "bus",
        serde_json::json!({"retry_min": "100ms", "retry_max": "1s", "batch_size": 500})
    )])
    .to_string();
    let worker = env
        .spawn_worker("w", &[("AUDITBRIDGE_DESTINATIONS", &dest)])
        .await?;
    worker.wait_ready(T).await?;
    let events = env.events(12_000);
    let all: HashSet<uuid::Uuid> = events.iter().map(|e| e.id).collect();

    let (first, rest) = events.split_at(3_000);
    env.publish(first).await?;
    // Stop the broker once forwarding is under way.
    let mut got = Vec::new();
    broker
        .collect_until(T, &mut got, |g| g.len() >= 1_000)
        .await?;
    let restart = StartAgain;
    rabbitmqctl(&["stop_app"])?;
    let stopped_at = Instant::now();

    // Ingest does not stall: the rest of the load is stored while the broker is down.
    env.publish(rest).await?;
    env.wait_for_count(12_000, T).await?;
    env.wait_for_drained(T).await?;
    let ingest_during_outage = stopped_at.elapsed();
    let mut worker = worker;
    assert!(worker.is_running());
    let up = worker
        .metric("auditbridge_destination_up{destination=\"bus\"}")
        .await?;
    assert_eq!(up, 0.0, "the destination should be reported down");

    drop(restart);
    broker
        .collect_until(T, &mut got, |g| {
            g.iter().flat_map(|m| m.ids(false)).collect::<HashSet<_>>() == all
        })
        .await?;
    let received: Vec<uuid::Uuid> = got.iter().flat_map(|m| m.ids(false)).collect();
    let duplicates = received.len() - all.len();
    // At least once: resends only of what was in flight when the broker went away.
    assert!(duplicates <= 1_000, "{duplicates} duplicates");
    eprintln!(
        "stored all 12000 events {ingest_during_outage:?} into the outage; {duplicates} duplicates on the bus"
    );
    Ok(())
}
