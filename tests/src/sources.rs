//! Harness for the source tests: `auditbridge serve` and `auditbridge tail-file` as processes
//! of the binary under test, pointed at a [`TestEnv`].

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use anyhow::bail;

use crate::{TestEnv, Worker, free_addr};

/// A process of the binary under test that may serve the API: a [`Worker`] (signals, exit,
/// metrics and log, through `Deref`) with the address it was given to listen on. Killed when
/// dropped.
pub struct Process {
    worker: Worker,
    /// `AUDITBRIDGE_API_ADDR` (serve).
    pub addr: SocketAddr,
}

impl Deref for Process {
    type Target = Worker;

    fn deref(&self) -> &Worker {
        &self.worker
    }
}

impl DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Worker {
        &mut self.worker
    }
}

impl Process {
    /// Starts `auditbridge <args>` with the environment's variables plus `extra`; its log goes
    /// to `target/test-logs/<tag>-<name>.log`.
    pub fn spawn(
        env: &TestEnv,
        name: &str,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        let addr = free_addr()?;
        let addr_s = addr.to_string();
        let mut vars = vec![("AUDITBRIDGE_API_ADDR", addr_s.as_str())];
        vars.extend_from_slice(extra);
        let worker = env.spawn(name, args, &vars)?;
        Ok(Process { worker, addr })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until the process answers HTTP on either address (any status).
    pub async fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let api = self.url("/healthz");
        let metrics = format!("http://{}/healthz", self.metrics);
        let log = self.log.clone();
        let what = format!("{api} or {metrics} to answer (log: {})", log.display());
        let listening = crate::eventually(&what, timeout, async || {
            match client.get(&api).send().await {
                Ok(_) => Ok(()),
                Err(_) => {
                    client.get(&metrics).send().await?;
                    Ok(())
                }
            }
        });
        tokio::select! {
            listening = listening => listening,
            status = self.worker.process.child.wait() => bail!(
                "exited with {}; log: {}",
                status?,
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }
}
