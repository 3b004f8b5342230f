//! A remote audit-log API on 127.0.0.1 for the pull-source tests, written to behave like the
//! APIs `type = "api"` sources poll:
//!
//! - `GET /api/v1/logs` like Okta's System Log: `limit` and an opaque `after`, a
//!   `Link: <…>; rel="next"` on every page (also an empty one: a polling query never ends),
//!   `X-Rate-Limit-*` headers with the reset in epoch seconds;
//! - `GET /v2/audit`, token-paged: `limit` and `page_token`, the page's events at `/data` and
//!   the next token at `/meta/next`, absent on the newest page; with
//!   [`RemoteApi::repeat_across_pages`] each page starts with the last event of the one before
//!   (APIs that page by time do that);
//! - `GET /activity`, by time window: `since`/`until` (RFC 3339), `limit`, `pageToken`, the
//!   events at `/items` and `nextPageToken`; an event can be [hidden](RemoteApi::push_hidden)
//!   until the test reveals it, to arrive late within a window already fetched;
//! - `POST /oauth/token`: OAuth 2 client credentials, short-lived tokens.
//!
//! Every request is logged; the next requests can be scripted to fail ([`Fault`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How one of the next API requests is answered instead of with its page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This status, no `Retry-After`.
    Status(u16),
    /// This status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// The page, after this long.
    Slow(Duration),
    /// 200 with a body cut in the middle of the page's JSON.
    Malformed,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub query: Vec<(String, String)>,
    pub authorization: Option<String>,
    pub answered: u16,
    /// Events in the page answered.
    pub items: usize,
    /// When it arrived (the log is in the order the answers were finished).
    pub at: Instant,
}

impl Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Remote {
    item: Value,
    /// The event's time (`published`), for windows.
    at: OffsetDateTime,
    visible: bool,
}

#[derive(Default)]
struct Shared {
    events: Mutex<Vec<Remote>>,
    faults: Mutex<VecDeque<Fault>>,
    log: Mutex<Vec<Request>>,
    /// Every page is answered after this long.
    delay: Mutex<Duration>,
    repeat: Mutex<bool>,
    /// Requests must carry `Authorization: <this>` (or a live OAuth token when `None` and
    /// `oauth` is set).
    authorization: Mutex<Option<String>>,
    oauth: Mutex<Option<OAuth>>,
    in_flight: AtomicUsize,
    addr: Mutex<Option<SocketAddr>>,
}

struct OAuth {
    client_id: String,
    client_secret: String,
    lifetime: Duration,
    issued: Vec<(String, Instant)>,
}

pub struct RemoteApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for RemoteApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RemoteApi {
    pub async fn start() -> anyhow::Result<RemoteApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        *shared.addr.lock().unwrap() = Some(addr);
        let app = Router::new()
            .route("/api/v1/logs", get(okta))
            .route("/v2/audit", get(token_paged))
            .route("/activity", get(windowed))
            .route("/oauth/token", post(oauth_token))
            .with_state(shared.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
        Ok(RemoteApi { addr, shared, stop })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Appends events (see [`item`]) that every API serves from now on.
    pub fn push(&self, items: impl IntoIterator<Item = Value>) {
        self.push_as(items, true);
    }

    /// Appends events served only after [`RemoteApi::reveal`]: late arrivals.
    pub fn push_hidden(&self, items: impl IntoIterator<Item = Value>) {
        self.push_as(items, false);
    }

    fn push_as(&self, items: impl IntoIterator<Item = Value>, visible: bool) {
        let mut events = self.shared.events.lock().unwrap();
        for item in items {
            let at = item["published"]
                .as_str()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                .unwrap_or_else(OffsetDateTime::now_utc);
            events.push(Remote { item, at, visible });
        }
    }

    pub fn reveal(&self) {
        for e in self.shared.events.lock().unwrap().iter_mut() {
            e.visible = true;
        }
    }

    /// Changes the content of the served event whose `uuid` is `uuid` (the remote side
    /// editing an event it already served).
    pub fn edit(&self, uuid: &str, change: impl Fn(&mut Value)) {
        for e in self.shared.events.lock().unwrap().iter_mut() {
            if e.item["uuid"] == uuid {
                change(&mut e.item);
            }
        }
    }

    /// The next API requests fail as listed, one each, in order.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.faults.lock().unwrap().extend(faults);
    }

    pub fn faults_left(&self) -> usize {
        self.shared.faults.lock().unwrap().len()
    }

    /// Every page answered after `d`.
    pub fn delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    pub fn repeat_across_pages(&self) {
        *self.shared.repeat.lock().unwrap() = true;
    }

    /// API requests without `Authorization: <value>` are answered 401.
    pub fn require_authorization(&self, value: &str) {
        *self.shared.authorization.lock().unwrap() = Some(value.to_owned());
    }

    /// API requests need a bearer token from `POST /oauth/token` for these client
    /// credentials, valid for `lifetime`.
    pub fn require_oauth(&self, client_id: &str, client_secret: &str, lifetime: Duration) {
        *self.shared.oauth.lock().unwrap() = Some(OAuth {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            lifetime,
            issued: Vec::new(),
        });
    }

    /// How many OAuth tokens were issued.
    pub fn tokens_issued(&self) -> usize {
        self.shared
            .oauth
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |o| o.issued.len())
    }

    /// Every API request answered so far, in the order they arrived.
    pub fn requests(&self) -> Vec<Request> {
        let mut log = self.shared.log.lock().unwrap().clone();
        log.sort_by_key(|r| r.at);
        log
    }

    /// API requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

/// A remote event in the shape of Okta's System Log.
pub fn item(uuid: &str, event_type: &str, published: OffsetDateTime) -> Value {
    json!({
        "uuid": uuid,
        "published": published.format(&Rfc3339).unwrap(),
        "eventType": event_type,
        "org": "acme",
        "actor": {"id": format!("00u{}", &uuid[..uuid.len().min(6)]), "type": "User"},
        "client": {"ipAddress": "203.0.113.7"},
        "outcome": {"result": "SUCCESS"},
        "target": [{"id": "0oa1", "type": "AppInstance"}],
    })
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn limit_of(q: &[(String, String)]) -> usize {
    param(q, "limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .clamp(1, 1000)
}

/// What every API route does first: the log entry, auth, scripted faults, the delay. `Err`
/// is the answer instead of the page.
struct Guard<'a> {
    shared: &'a Shared,
    request: Request,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.shared.log.lock().unwrap().push(self.request.clone());
    }
}

#[allow(clippy::result_large_err)]
async fn enter<'a>(
    shared: &'a Shared,
    path: &str,
    query: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Guard<'a>, Response> {
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut guard = Guard {
        shared,
        request: Request {
            path: path.to_owned(),
            query,
            authorization: authorization.clone(),
            answered: 200,
            items: 0,
            at: Instant::now(),
        },
    };
    // The answer instead of the page, given at once: its size does not matter.
    #[allow(clippy::result_large_err)]
    let refuse = |mut guard: Guard<'a>, status: u16, response: Response| {
        // Logged as answered when dropped here.
        guard.request.answered = status;
        Err(response)
    };
    let expected = shared.authorization.lock().unwrap().clone();
    if let Some(expected) = expected
        && authorization.as_deref() != Some(expected.as_str())
    {
        return refuse(
            guard,
            401,
            (StatusCode::UNAUTHORIZED, "bad credentials").into_response(),
        );
    }
    let oauth_ok = match shared.oauth.lock().unwrap().as_ref() {
        None => true,
        Some(o) => o.issued.iter().any(|(t, at)| {
            authorization.as_deref() == Some(format!("Bearer {t}").as_str())
                && at.elapsed() < o.lifetime
        }),
    };
    if !oauth_ok {
        return refuse(
            guard,
            401,
            (StatusCode::UNAUTHORIZED, "token expired or unknown").into_response(),
        );
    }
    let fault = shared.faults.lock().unwrap().pop_front();
    let delay = *shared.delay.lock().unwrap();
    match fault {
        Some(Fault::Status(s)) => {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return refuse(guard, s, (status, "scripted failure").into_response());
        }
        Some(Fault::RetryAfter(s, secs)) => {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let response =
                (status, [("retry-after", secs.to_string())], "slow down").into_response();
            return refuse(guard, s, response);
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Malformed) => {
            guard.request.answered = 200;
            let body = r#"[{"uuid": "cut-1", "eventType": "user.session.start"}, {"uuid": "cu"#;
            return Err(([("content-type", "application/json")], body).into_response());
        }
        None => {}
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(guard)
}

fn base(shared: &Shared) -> String {
    format!("http://{}", shared.addr.lock().unwrap().expect("started"))
}

async fn okta(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let limit = limit_of(&query);
    let after: usize = param(&query, "after")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let mut guard = match enter(&shared, "/api/v1/logs", query, &headers).await {
        Ok(g) => g,
        Err(response) => return response,
    };
    let page: Vec<Value> = {
        let events = shared.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e.visible)
            .skip(after)
            .take(limit)
            .map(|e| e.item.clone())
            .collect()
    };
    guard.request.items = page.len();
    let next = after + page.len();
    let base = base(&shared);
    let reset = OffsetDateTime::now_utc().unix_timestamp() + 60;
    (
        [
            (
                "link",
                format!("<{base}/api/v1/logs?limit={limit}&after={after}>; rel=\"self\""),
            ),
            (
                "link",
                format!("<{base}/api/v1/logs?limit={limit}&after={next}>; rel=\"next\""),
            ),
            ("x-rate-limit-limit", "10000".to_owned()),
            ("x-rate-limit-remaining", "9999".to_owned()),
            ("x-rate-limit-reset", reset.to_string()),
        ],
        axum::Json(page),
    )
        .into_response()
}

async fn token_paged(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let limit = limit_of(&query);
    let at: usize = param(&query, "page_token")
        .and_then(|t| t.strip_prefix("p-"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let mut guard = match enter(&shared, "/v2/audit", query, &headers).await {
        Ok(g) => g,
        Err(response) => return response,
    };
    let repeat = *shared.repeat.lock().unwrap();
    let start = if repeat { at.saturating_sub(1) } else { at };
    let (page, total) = {
        let events = shared.events.lock().unwrap();
        let visible: Vec<&Remote> = events.iter().filter(|e| e.visible).collect();
        let page: Vec<Value> = visible
            .iter()
            .skip(start)
            .take(limit)
            .map(|e| e.item.clone())
            .collect();
        (page, visible.len())
    };
    guard.request.items = page.len();
    let next = start + page.len();
    let mut body = json!({"data": page, "meta": {}});
    if next < total || (page.len() == limit && next > at) {
        body["meta"]["next"] = format!("p-{next}").into();
    }
    axum::Json(body).into_response()
}

async fn windowed(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let limit = limit_of(&query);
    let time =
        |name: &str| param(&query, name).and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
    let (Some(since), Some(until)) = (time("since"), time("until")) else {
        return (StatusCode::BAD_REQUEST, "since and until are required").into_response();
    };
    let offset: usize = param(&query, "pageToken")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let mut guard = match enter(&shared, "/activity", query, &headers).await {
        Ok(g) => g,
        Err(response) => return response,
    };
    let (page, total) = {
        let events = shared.events.lock().unwrap();
        let mut inside: Vec<&Remote> = events
            .iter()
            .filter(|e| e.visible && e.at >= since && e.at < until)
            .collect();
        inside.sort_by_key(|e| e.at);
        let page: Vec<Value> = inside
            .iter()
            .skip(offset)
            .take(limit)
            .map(|e| e.item.clone())
            .collect();
        (page, inside.len())
    };
    guard.request.items = page.len();
    let next = offset + page.len();
    let mut body = json!({"kind": "activity", "items": page});
    if next < total {
        body["nextPageToken"] = next.to_string().into();
    }
    axum::Json(body).into_response()
}

async fn oauth_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut form: Vec<(String, String)> = url_pairs(&body);
    // RFC 6749, 2.3.1: the client's id and secret in HTTP Basic, each form-encoded first.
    if let Some((id, secret)) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b).ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|text| {
            let (id, secret) = text.split_once(':')?;
            let decode = |s: &str| url_pairs(&format!("v={s}")).pop().map(|(_, v)| v);
            Some((decode(id)?, decode(secret)?))
        })
    {
        form.push(("client_id".into(), id));
        form.push(("client_secret".into(), secret));
    }
    let get = |k: &str| param(&form, k).unwrap_or("").to_owned();
    let mut oauth = shared.oauth.lock().unwrap();
    let Some(o) = oauth.as_mut() else {
        return (StatusCode::NOT_FOUND, "no OAuth here").into_response();
    };
    if get("grant_type") != "client_credentials"
        || get("client_id") != o.client_id
        || get("client_secret") != o.client_secret
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let token = format!("tok-{}", o.issued.len() + 1);
    o.issued.push((token.clone(), Instant::now()));
    axum::Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": o.lifetime.as_secs(),
    }))
    .into_response()
}

fn url_pairs(body: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{body}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}
