//! An `auditbridge serve` for one test: the real server, in process, on a free port, over the
//! test's own database and NATS names, with tokens made for it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::TestEnv;

/// A running API server. Stopped when dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A token and its configuration entry.
pub struct Token {
    pub token: String,
    pub entry: Value,
}

impl Token {
    /// A token for one tenant with the given scopes.
    pub fn tenant(name: &str, tenant: &str, scopes: &[&str]) -> Token {
        let token = auditbridge_api::auth::generate_token();
        let entry = json!({"name": name, "sha256": auditbridge_api::auth::hash_token(&token),
            "tenant": tenant, "scopes": scopes});
        Token { token, entry }
    }

    /// A token for every tenant.
    pub fn admin(name: &str, scopes: &[&str]) -> Token {
        let token = auditbridge_api::auth::generate_token();
        let entry = json!({"name": name, "sha256": auditbridge_api::auth::hash_token(&token),
            "admin": true, "scopes": scopes});
        Token { token, entry }
    }
}

impl ApiServer {
    /// Starts `serve` for `env` with these tokens and extra `AUDITBRIDGE_*` settings.
    pub async fn start(
        env: &TestEnv,
        tokens: &[&Token],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<ApiServer> {
        let mut vars = env.env_vars();
        vars.push(("AUDITBRIDGE_API_ADDR".into(), "127.0.0.1:0".into()));
        vars.push((
            "AUDITBRIDGE_API_TOKENS".into(),
            Value::Array(tokens.iter().map(|t| t.entry.clone()).collect()).to_string(),
        ));
        vars.push(("AUDITBRIDGE_SHUTDOWN_TIMEOUT".into(), "2s".into()));
        vars.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let config = auditbridge_config::Config::from_env(vars)?;
        let server = auditbridge_api::Server::build(config).await?;
        let addr = server.local_addr();
        let metrics = server.metrics_addr();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.run(shutdown.clone()));
        Ok(ApiServer {
            addr,
            metrics,
            http: reqwest::Client::new(),
            shutdown,
            handle: Some(handle),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET with a bearer token (if any); the status and the body as JSON (or a string).
    pub async fn get(&self, path: &str, token: Option<&Token>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(&t.token);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// Every event of a query, page by page (`limit` per page); fails on a page error.
    pub async fn all_pages(
        &self,
        query: &str,
        token: &Token,
        limit: usize,
    ) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100_000 {
            let mut path = format!("/v1/events?{query}&limit={limit}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, body) = self.get(&path, Some(token)).await?;
            if status != 200 {
                bail!("{path}: {status} {body}");
            }
            let events = body["events"].as_array().context("events")?;
            out.extend(events.iter().cloned());
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
        bail!("more than 100,000 pages")
    }

    /// Opens the live tail.
    /// Replays the live tail from `from` to its caught-up mark as a browser's EventSource
    /// does: when the server ends the stream (a statement cut by a short statement timeout on
    /// a loaded machine), it reconnects with the last id it saw, at most `reconnects` times.
    /// Every id the server sends, the id-only progress events included, is a resume point, so
    /// a replay that moves forward finishes; one stuck at one place uses up its reconnects.
    pub async fn replay(
        &self,
        query: &str,
        token: &Token,
        from: &str,
        timeout: Duration,
        reconnects: usize,
    ) -> anyhow::Result<Vec<Sse>> {
        tokio::time::timeout(timeout, async {
            let mut last = from.to_owned();
            let mut replayed = Vec::new();
            for _ in 0..=reconnects {
                let mut tail = self.stream(query, token, Some(&last)).await?;
                loop {
                    match tail.next_unbounded().await? {
                        Some(e) if e.event == "caught-up" => return Ok(replayed),
                        Some(e) => {
                            if let Some(id) = &e.id {
                                last = id.clone();
                            }
                            if e.event == "audit" {
                                replayed.push(e);
                            }
                        }
                        None => break,
                    }
                }
            }
            bail!("the replay did not catch up within {reconnects} reconnects (last id {last})")
        })
        .await
        .map_err(|_| anyhow!("the replay did not catch up within {timeout:?}"))?
    }

    pub async fn stream(
        &self,
        query: &str,
        token: &Token,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<SseClient> {
        let mut req = self
            .http
            .get(self.url(&format!("/v1/events/stream?{query}")))
            .bearer_auth(&token.token);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await?;
        if resp.status() != 200 {
            bail!("stream: {} {}", resp.status(), resp.text().await?);
        }
        Ok(SseClient {
            resp,
            buf: String::new(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A reader of a live tail.
pub struct SseClient {
    resp: reqwest::Response,
    buf: String,
}

impl SseClient {
    /// The next event (heartbeat comments are skipped), or `None` when the server closed
    /// the stream. Fails after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Sse>> {
        tokio::time::timeout(timeout, self.next_unbounded())
            .await
            .map_err(|_| anyhow!("no event within {timeout:?}"))?
    }

    /// [`SseClient::next`] without a bound; the callers bound it.
    async fn next_unbounded(&mut self) -> anyhow::Result<Option<Sse>> {
        loop {
            while let Some(cut) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..cut + 2).collect();
                let mut sse = Sse {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        sse.event = v.trim().to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        sse.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        sse.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Ok(Some(sse));
                }
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }

    /// Raw bytes received so far that are not yet parsed (for heartbeat checks).
    pub async fn next_raw(&mut self, timeout: Duration) -> anyhow::Result<Option<String>> {
        match tokio::time::timeout(timeout, self.resp.chunk()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(chunk))) => Ok(Some(String::from_utf8_lossy(&chunk).into_owned())),
            Ok(_) => Ok(None),
        }
    }

    /// Reads `audit` events until `n` arrived; fails after `timeout`.
    pub async fn audit_events(&mut self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Sse>> {
        let mut out = Vec::with_capacity(n);
        let read = tokio::time::timeout(timeout, async {
            while out.len() < n {
                match self.next_unbounded().await? {
                    Some(e) if e.event == "audit" => out.push(e),
                    Some(_) => {}
                    None => bail!("stream ended after {} of {n} events", out.len()),
                }
            }
            Ok(())
        })
        .await;
        match read {
            Ok(read) => read.map(|()| out),
            Err(_) => bail!("no event within {timeout:?} ({} of {n} events)", out.len()),
        }
    }

    /// Waits for the `caught-up` marker (the end of the replay).
    pub async fn caught_up(&mut self, timeout: Duration) -> anyhow::Result<Vec<Sse>> {
        tokio::time::timeout(timeout, async {
            let mut replayed = Vec::new();
            loop {
                match self.next_unbounded().await? {
                    Some(e) if e.event == "caught-up" => return Ok(replayed),
                    Some(e) if e.event == "audit" => replayed.push(e),
                    Some(_) => {}
                    None => bail!("stream ended before caught-up"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no event within {timeout:?}"))?
    }
}
