//! A webhook receiver on 127.0.0.1 whose answers a test scripts (200, 500, 429 with
//! Retry-After, 400...) and which records every request, to check what a destination got.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use uuid::Uuid;

/// How the receiver answers the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    TooMany(u64),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub answered: u16,
    pub at: Instant,
}

impl Received {
    /// Event ids in an NDJSON or JSON-array body.
    pub fn ids(&self) -> Vec<Uuid> {
        let text = String::from_utf8_lossy(&self.body);
        let values: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
            serde_json::from_str(&text).unwrap_or_default()
        } else {
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        values
            .iter()
            .filter_map(|v| v["id"].as_str()?.parse().ok())
            .collect()
    }
}

#[derive(Clone, Default)]
struct Shared {
    answer: Arc<Mutex<Option<Answer>>>,
    /// Requests carrying any of these event ids are answered 400, whatever `answer` says.
    refused: Arc<Mutex<HashSet<Uuid>>>,
    log: Arc<Mutex<Vec<Received>>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Shared,
    stop: tokio_util::sync::CancellationToken,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Shared::default();
        *shared.answer.lock().unwrap() = Some(Answer::Ok);
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(shared.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
        Ok(Receiver { addr, shared, stop })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn answer(&self, a: Answer) {
        *self.shared.answer.lock().unwrap() = Some(a);
    }

    /// Answers 400 to every request whose body holds one of `ids` (a receiver that cannot take
    /// those events), and as scripted by [`Receiver::answer`] otherwise.
    pub fn refuse_ids(&self, ids: impl IntoIterator<Item = Uuid>) {
        *self.shared.refused.lock().unwrap() = ids.into_iter().collect();
    }

    pub fn requests(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Ids of events in requests that were answered 2xx (delivered).
    pub fn delivered(&self) -> HashSet<Uuid> {
        self.requests()
            .iter()
            .filter(|r| (200..300).contains(&r.answered))
            .flat_map(|r| r.ids())
            .collect()
    }

    /// Ids delivered (answered 2xx) on one path, e.g. `/siem`.
    pub fn delivered_on(&self, path: &str) -> HashSet<Uuid> {
        self.requests()
            .iter()
            .filter(|r| r.path == path && (200..300).contains(&r.answered))
            .flat_map(|r| r.ids())
            .collect()
    }

    /// Like [`Receiver::delivered`] but counting repeats.
    pub fn delivered_count(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| (200..300).contains(&r.answered))
            .map(|r| r.ids().len())
            .sum()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(
    State(shared): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = shared.answer.lock().unwrap().unwrap_or(Answer::Ok);
    let (status, retry_after) = match answer {
        Answer::Ok => (200, None),
        Answer::Status(s) => (s, None),
        Answer::TooMany(secs) => (429, Some(secs)),
    };
    let mut received = Received {
        path: uri.path().to_owned(),
        headers,
        body,
        answered: status,
        at: Instant::now(),
    };
    let refused = {
        let refused = shared.refused.lock().unwrap();
        received.ids().into_iter().find(|id| refused.contains(id))
    };
    if let Some(id) = refused {
        received.answered = 400;
        shared.log.lock().unwrap().push(received);
        return (
            StatusCode::BAD_REQUEST,
            format!("event {id}: field x is not allowed here"),
        )
            .into_response();
    }
    shared.log.lock().unwrap().push(received);
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match retry_after {
        Some(s) => (code, [("retry-after", s.to_string())], "slow down").into_response(),
        None => (code, "").into_response(),
    }
}
