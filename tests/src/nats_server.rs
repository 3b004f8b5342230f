//! A private `nats-server` for tests that take NATS away. The shared server on port 4222 must
//! stay up for the tests running beside them, so these start their own, kill it (a real
//! fault: SIGKILL) and start it again on the same port with the same JetStream directory.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::process::{Child, Command};

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A `nats-server -js` of a test's own. Killed, and its directory removed, when dropped.
pub struct NatsServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port and waits until it accepts clients.
    pub async fn start() -> anyhow::Result<NatsServer> {
        let port = crate::free_addr()?.port();
        let dir = std::env::temp_dir().join(format!("ab-nats-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut server = NatsServer {
            port,
            dir,
            child: None,
        };
        server.restart().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again): same port, same store directory, so streams, consumers
    /// and messages survive as they would a real restart.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the private nats-server is already running");
        }
        let log = std::fs::File::create(self.dir.join("server.log"))?;
        let child = Command::new(NATS_SERVER)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("js"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {NATS_SERVER}"))?;
        self.child = Some(child);
        self.wait_accepting(Duration::from_secs(15)).await
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("the private nats-server is not running");
        };
        child.start_kill()?;
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .context("nats-server did not exit after SIGKILL")??;
        Ok(())
    }

    /// Waits until a client connection succeeds and JetStream answers.
    async fn wait_accepting(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.url();
        let log = self.dir.join("server.log");
        let Some(child) = &mut self.child else {
            bail!("the private nats-server is not running");
        };
        let what = format!("the private nats-server at {url} to accept clients");
        let accepting = crate::eventually(&what, timeout, async || {
            let attempt = async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(1))
                    .connect(url.as_str())
                    .await?;
                // JetStream answers its API (the reply's shape is not this test's business).
                client.request("$JS.API.INFO", "".into()).await?;
                anyhow::Ok(())
            };
            tokio::time::timeout(Duration::from_secs(2), attempt)
                .await
                .map_err(|_| anyhow!("no answer within 2 s"))?
        });
        tokio::select! {
            accepting = accepting => accepting,
            status = child.wait() => {
                bail!("nats-server exited with {}; log: {}", status?, log.display())
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
