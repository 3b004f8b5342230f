//! Harness for the source tests: `auditbridge serve` and `auditbridge tail-file` as processes
//! of the binary under test, pointed at a [`TestEnv`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Child;

use crate::{TestEnv, free_addr};

/// A process of the binary under test. Killed when dropped.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
    /// `AUDITBRIDGE_API_ADDR` (serve).
    pub addr: SocketAddr,
    /// `AUDITBRIDGE_METRICS_ADDR` (`/metrics`, `/healthz`).
    pub metrics: SocketAddr,
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
        let metrics = free_addr()?;
        let addr_s = addr.to_string();
        let metrics_s = metrics.to_string();
        let mut vars: Vec<(&str, &str)> = vec![
            ("AUDITBRIDGE_API_ADDR", &addr_s),
            ("AUDITBRIDGE_METRICS_ADDR", &metrics_s),
        ];
        vars.extend_from_slice(extra);
        let log = crate::log_path(&format!("{}-{name}", env.tag));
        let file = std::fs::File::create(&log)?;
        let child = env
            .command(args, &vars)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning auditbridge {args:?}"))?;
        Ok(Process {
            child,
            log,
            addr,
            metrics,
        })
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
            status = self.child.wait() => bail!(
                "exited with {}; log: {}",
                status?,
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the process is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "did not exit within {timeout:?}; log: {}",
                    self.log.display()
                )
            })?
            .context("waiting for the process")
    }

    /// The value of a metric line (name with its labels, exactly as rendered) from `/metrics`.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let body = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await?
            .text()
            .await?;
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
