//! Shared harness for the end-to-end tests: each test gets its own database, subject prefix,
//! stream and consumer on the real local services, so tests run in parallel and leave nothing
//! behind (the environment cleans up when dropped, even after a failed assertion).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream;
use auditbridge_event::{Event, synth::Generator};
use bytes::Bytes;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub mod api;
pub mod cluster;
mod eventually;
pub mod nats_server;
pub mod proxy;
pub mod rabbit;
pub mod receiver;
pub mod sources;

pub use eventually::{eventually, until};

pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432";
/// `AUDITBRIDGE_ID_KEY` of every process a test starts (sources derive ids with it).
pub const ID_KEY: &str = "test-id-key-for-derived-ids-0123456789abcdef";

/// The [`ID_KEY`] as the sources crate takes it, to compute the ids a source derives.
pub fn id_key() -> auditbridge_sources::IdKey {
    auditbridge_sources::IdKey::new(ID_KEY)
}

/// The binary under test. Cargo builds this package's binary before its integration tests and
/// puts it next to the `deps/` folder that holds the test executables.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in <target>/<profile>/deps");
    dir.join("auditbridge-under-test")
}

/// One test's private corner of the shared services.
pub struct TestEnv {
    pub tag: String,
    pub database_url: String,
    pub prefix: String,
    pub stream: String,
    pub consumer: String,
    pub js: jetstream::Context,
    pub nats: async_nats::Client,
    pub pool: PgPool,
    generator: Generator,
}

impl TestEnv {
    /// Creates and migrates a fresh database; names a fresh stream and consumer (created by
    /// the first worker, as in production).
    pub async fn new() -> anyhow::Result<TestEnv> {
        let tag = Uuid::now_v7().simple().to_string()[18..].to_owned();
        let database_url = format!("{PG_BASE}/ab_test_{tag}");
        auditbridge_store::migrate(&database_url).await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url)
            .await?;
        let nats = async_nats::connect(NATS_URL).await?;
        Ok(TestEnv {
            prefix: format!("t{tag}"),
            stream: format!("ABT_{tag}"),
            consumer: format!("c_{tag}"),
            js: jetstream::new(nats.clone()),
            nats,
            pool,
            database_url,
            generator: Generator::new(u64::from_str_radix(&tag[..8], 16).unwrap_or(1), 5),
            tag,
        })
    }

    /// The `AUDITBRIDGE_*` variables that point a process at this environment.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("AUDITBRIDGE_DATABASE_URL".into(), self.database_url.clone()),
            ("AUDITBRIDGE_NATS_URL".into(), NATS_URL.into()),
            ("AUDITBRIDGE_SUBJECT_PREFIX".into(), self.prefix.clone()),
            ("AUDITBRIDGE_STREAM".into(), self.stream.clone()),
            ("AUDITBRIDGE_CONSUMER".into(), self.consumer.clone()),
            ("AUDITBRIDGE_METRICS_ADDR".into(), "127.0.0.1:0".into()),
            // Tests kill workers; a short ack wait makes JetStream redeliver their messages
            // quickly.
            ("AUDITBRIDGE_ACK_WAIT".into(), "3s".into()),
            ("AUDITBRIDGE_LOG".into(), "info".into()),
            ("AUDITBRIDGE_ID_KEY".into(), ID_KEY.into()),
        ]
    }

    /// A command for the binary with this environment's variables (plus `extra`).
    pub fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(args).env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(self.env_vars());
        cmd.envs(extra.iter().map(|(k, v)| (*k, *v)));
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// Starts a worker process; its log goes to `target/test-logs/<tag>-<name>.log`.
    pub async fn spawn_worker(&self, name: &str, extra: &[(&str, &str)]) -> anyhow::Result<Worker> {
        let metrics = free_addr()?;
        let metrics_s = metrics.to_string();
        let mut vars: Vec<(&str, &str)> = vec![("AUDITBRIDGE_METRICS_ADDR", &metrics_s)];
        vars.extend_from_slice(extra);
        let log = log_path(&format!("{}-{name}", self.tag));
        let file = std::fs::File::create(&log)?;
        let child = self
            .command(&["worker"], &vars)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawning a worker")?;
        Ok(Worker {
            child,
            metrics,
            log,
        })
    }

    /// `n` fresh valid events from the synthetic generator.
    pub fn events(&mut self, n: usize) -> Vec<Event> {
        (0..n).map(|_| self.generator.next_event()).collect()
    }

    /// Publishes events with `Nats-Msg-Id: <tenant>:<id>` (as every producer does), waiting for
    /// every JetStream ack. Creates the
    /// stream first if no worker has yet.
    pub async fn publish(&self, events: &[Event]) -> anyhow::Result<()> {
        self.ensure_stream().await?;
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            let payload = serde_json::to_vec(e)?;
            acks.push(
                self.publish_raw(&e.subject(&self.prefix), payload, Some(&e.message_id()))
                    .await?,
            );
            if acks.len() >= 2000 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
        for a in acks {
            a.await?;
        }
        Ok(())
    }

    /// Publishes one message as given (for poison input), optionally with a `Nats-Msg-Id`.
    pub async fn publish_raw(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
        msg_id: Option<&str>,
    ) -> anyhow::Result<jetstream::context::PublishAckFuture> {
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        Ok(self
            .js
            .publish_with_headers(subject.to_owned(), headers, payload.into())
            .await?)
    }

    /// Creates the stream exactly as a worker would, so events can be published before any
    /// worker runs.
    pub async fn ensure_stream(&self) -> anyhow::Result<()> {
        auditbridge_runtime::provision::ensure_stream(&self.js, &self.config()).await?;
        Ok(())
    }

    /// A configuration for this environment, for in-process use of the library crates.
    pub fn config(&self) -> auditbridge_config::Config {
        auditbridge_config::Config::from_env(self.env_vars()).expect("test configuration is valid")
    }

    pub async fn count(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM audit_events")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Every stored id; fails if any id is stored twice (it cannot be, by the primary key,
    /// but the tests say what they rely on).
    pub async fn stored_ids(&self) -> anyhow::Result<HashSet<Uuid>> {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM audit_events")
            .fetch_all(&self.pool)
            .await?;
        let set: HashSet<Uuid> = ids.iter().copied().collect();
        if set.len() != ids.len() {
            bail!("{} ids stored more than once", ids.len() - set.len());
        }
        Ok(set)
    }

    /// Waits until at least `n` events are stored, or fails after `timeout`.
    pub async fn wait_for_count(&self, n: i64, timeout: Duration) -> anyhow::Result<()> {
        eventually(&format!("{n} events stored"), timeout, async || {
            let have = self.count().await?;
            ensure!(have >= n, "{have} of {n} events stored");
            Ok(())
        })
        .await
    }

    /// Waits until every stored event is below the commit-safe horizon (older than every
    /// transaction still running anywhere on the server), so that a live tail or relay
    /// starting "now" starts after them. A transaction of another test running in parallel can
    /// hold the horizon back for a moment.
    pub async fn wait_below_horizon(&self, timeout: Duration) -> anyhow::Result<()> {
        eventually(
            "every stored event below the commit-safe horizon",
            timeout,
            async || {
                let passed: bool = sqlx::query_scalar(
                    "SELECT coalesce(max(tx_id) < pg_snapshot_xmin(pg_current_snapshot()), true) \
                     FROM audit_events",
                )
                .fetch_one(&self.pool)
                .await?;
                ensure!(passed, "stored events are above the horizon");
                Ok(())
            },
        )
        .await
    }

    /// Waits until the consumer has nothing pending and nothing unacknowledged.
    pub async fn wait_for_drained(&self, timeout: Duration) -> anyhow::Result<()> {
        let stream = self.js.get_stream(&self.stream).await?;
        eventually("the consumer drained", timeout, async || {
            let info = stream.consumer_info(&self.consumer).await?;
            ensure!(
                info.num_pending == 0 && info.num_ack_pending == 0,
                "{} pending, {} unacknowledged",
                info.num_pending,
                info.num_ack_pending
            );
            Ok(())
        })
        .await
    }

    /// (kind, reason, subject) of every dead letter, oldest first.
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        Ok(
            sqlx::query_as("SELECT kind, reason, subject FROM dead_letters ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

/// Runs async clean-up from a `Drop` and waits for it: on a thread of its own with a runtime
/// of its own, because a runtime cannot be blocked on from inside another (and a test's
/// runtime may be the one unwinding).
pub fn run_cleanup(cleanup: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for cleanup")
            .block_on(cleanup);
    })
    .join();
}

impl Drop for TestEnv {
    // Runs even when an assertion failed, so no stream or database outlives its test.
    fn drop(&mut self) {
        let stream = self.stream.clone();
        let url = self.database_url.clone();
        let pool = self.pool.clone();
        run_cleanup(async move {
            pool.close().await;
            if let Ok(client) = async_nats::connect(NATS_URL).await {
                let _ = jetstream::new(client).delete_stream(&stream).await;
            }
            let _ = auditbridge_store::drop_database(&url).await;
        });
    }
}

/// A worker process. Killed when dropped.
pub struct Worker {
    pub child: Child,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the worker is running")
    }

    /// Sends a signal (`"KILL"`, `"TERM"`, `"INT"`).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit; fails if it does not within `timeout`.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("worker did not exit within {timeout:?}"))?
            .context("waiting for the worker")
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// GETs a path from the worker's metrics server.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let resp = reqwest::get(format!("http://{}{path}", self.metrics)).await?;
        Ok((resp.status().as_u16(), resp.text().await?))
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        eventually(
            &format!("the worker ready (log: {})", self.log.display()),
            timeout,
            async || {
                let (status, body) = self.get("/readyz").await?;
                ensure!(status == 200, "/readyz: {status} {body}");
                Ok(())
            },
        )
        .await
    }

    /// The value of an unlabelled counter or gauge from `/metrics`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (_, body) = self.get("/metrics").await?;
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A loopback address that was free a moment ago.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `target/<profile>/test-logs/<name>.log` (the folder is created).
pub(crate) fn log_path(name: &str) -> PathBuf {
    let dir = binary().with_file_name("test-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{name}.log"))
}
