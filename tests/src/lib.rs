//! Shared harness for the end-to-end tests: each test gets its own database, subject prefix,
//! stream and consumer on the real local services, so tests run in parallel and leave nothing
//! behind (the environment cleans up when dropped, even after a failed assertion). The corner
//! itself, processes and the RabbitMQ exchange are `auditbridge-fixtures`, shared with the
//! benchmarks; this crate adds the suite's settings and what only tests need.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream;
use auditbridge_event::{Event, synth::Generator};
use auditbridge_fixtures::{Env, Process, Purpose, Scratch};
use bytes::Bytes;
use tokio::process::Command;
use uuid::Uuid;

pub mod api;
pub mod cluster;
mod eventually;
pub mod nats_server;
pub mod proxy;
pub mod rabbit;
pub mod receiver;
pub mod remote_api;
pub mod sources;

pub use auditbridge_fixtures::run_cleanup;
pub use eventually::{eventually, until};

pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432";
/// `AUDITBRIDGE_ID_KEY` of every process a test starts (sources derive ids with it).
pub const ID_KEY: &str = "test-id-key-for-derived-ids-0123456789abcdef";

/// The [`ID_KEY`] as the sources crate takes it, to compute the ids a source derives.
pub fn id_key() -> auditbridge_sources::IdKey {
    auditbridge_sources::IdKey::new(ID_KEY)
}

/// Source definitions (a JSON array), loaded by the configuration as `serve` and `tail-file`
/// load them, with [`ID_KEY`] as `AUDITBRIDGE_ID_KEY`.
pub fn load_sources(
    definitions: &serde_json::Value,
) -> anyhow::Result<Vec<auditbridge_config::SourceConfig>> {
    let vars = [
        ("AUDITBRIDGE_SOURCES".to_owned(), definitions.to_string()),
        ("AUDITBRIDGE_ID_KEY".to_owned(), ID_KEY.to_owned()),
    ];
    Ok(auditbridge_config::Config::from_env(vars)?.sources)
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

/// What every process a test starts gets on top of its corner's names.
const SETTINGS: [(&str, &str); 4] = [
    ("AUDITBRIDGE_METRICS_ADDR", "127.0.0.1:0"),
    // Tests kill workers; a short ack wait makes JetStream redeliver their messages quickly.
    ("AUDITBRIDGE_ACK_WAIT", "3s"),
    ("AUDITBRIDGE_LOG", "info"),
    ("AUDITBRIDGE_ID_KEY", ID_KEY),
];

/// One test's private corner of the shared services: a [`Scratch`] (its names, `tag`,
/// `database_url`, `prefix`, `stream`, `consumer`, and its `pool`, are read through `Deref`),
/// a NATS connection, and the suite's settings. The corner is removed when this is dropped.
pub struct TestEnv {
    scratch: Scratch,
    pub js: jetstream::Context,
    pub nats: async_nats::Client,
    generator: Generator,
}

impl Deref for TestEnv {
    type Target = Scratch;

    fn deref(&self) -> &Scratch {
        &self.scratch
    }
}

impl TestEnv {
    /// Creates and migrates a fresh database; names a fresh stream and consumer (created by
    /// the first worker, as in production).
    pub async fn new() -> anyhow::Result<TestEnv> {
        TestEnv::with_retention(None).await
    }

    /// [`TestEnv::new`] whose database has `retention` stored before its first partitions.
    pub async fn with_retention(
        retention: Option<&auditbridge_store::RetentionPolicy>,
    ) -> anyhow::Result<TestEnv> {
        let scratch = Scratch::create_with(Purpose::Test, PG_BASE, NATS_URL, retention).await?;
        let nats = async_nats::connect(NATS_URL).await?;
        let seed = u64::from_str_radix(&scratch.tag[..8], 16).unwrap_or(1);
        Ok(TestEnv {
            js: jetstream::new(nats.clone()),
            nats,
            generator: Generator::new(seed, 5),
            scratch,
        })
    }

    /// The `AUDITBRIDGE_*` variables that point a process at this environment.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let names = self.scratch.env_vars().into_iter();
        let settings = SETTINGS.iter().map(|(k, v)| (*k, (*v).to_owned()));
        names
            .chain(settings)
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    /// A command for the binary with this environment's variables (plus `extra`), in an
    /// environment of nothing else but `PATH`.
    pub fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut cmd = self.scratch.command(&binary(), args, Env::Clean);
        cmd.envs(SETTINGS).envs(extra.iter().copied());
        cmd
    }

    /// Runs `auditbridge <args>` to its end: its exit code and its stdout then stderr.
    pub async fn run(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<(Option<i32>, String)> {
        let out = self.command(args, extra).output().await?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// Starts a worker process; its log goes to `target/test-logs/<tag>-<name>.log`.
    pub async fn spawn_worker(&self, name: &str, extra: &[(&str, &str)]) -> anyhow::Result<Worker> {
        self.spawn(name, &["worker"], extra)
    }

    /// Starts `auditbridge <args>` with this environment's variables, `/metrics` on a free
    /// port, and `extra`; its log goes to `target/test-logs/<tag>-<name>.log`.
    pub(crate) fn spawn(
        &self,
        name: &str,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Worker> {
        let metrics = free_addr()?;
        let metrics_s = metrics.to_string();
        let mut vars = vec![("AUDITBRIDGE_METRICS_ADDR", metrics_s.as_str())];
        vars.extend_from_slice(extra);
        let log = log_path(&format!("{}-{name}", self.tag));
        let process = Process::spawn(&mut self.command(args, &vars), Some(&log))
            .with_context(|| format!("spawning auditbridge {args:?}"))?;
        Ok(Worker {
            process,
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
        self.scratch.count_events().await
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

/// A process of the binary under test with its `/metrics` address and its log: a worker, or
/// the core of a [`sources::Process`] (`serve`, `tail-file`). Killed when dropped.
pub struct Worker {
    pub process: Process,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.process.pid().expect("the worker is running")
    }

    /// Sends a signal (`"KILL"`, `"TERM"`, `"INT"`); panics if it cannot.
    pub fn signal(&self, signal: &str) {
        if let Err(e) = self.process.signal(signal) {
            panic!("kill -{signal}: {e:#}");
        }
    }

    /// Waits for the process to exit; fails if it does not within `timeout`.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let log = self.log.display();
        self.process
            .wait_exit(timeout)
            .await
            .with_context(|| format!("log: {log}"))
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
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

    /// The value of a metric line (name with its labels, exactly as rendered; 0 when absent)
    /// from `/metrics`.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let (_, body) = self.get("/metrics").await?;
        Ok(body
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0))
    }

    /// The sum of the series of `name` whose labels include every one of `labels` (label
    /// order as the exporter writes them does not matter); 0 when there are none.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (_, body) = self.get("/metrics").await?;
        Ok(body
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (series, value) = rest.rsplit_once(' ')?;
                if !(series.is_empty() || series.starts_with('{')) {
                    return None;
                }
                labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
                    .then(|| value.trim().parse::<f64>().ok())
                    .flatten()
            })
            .sum())
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

/// A scratch directory of a test's own under the system's temporary directory, removed when
/// dropped (also when the test fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `<tmp>/<label>-<random>`.
    pub fn new(label: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{label}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
