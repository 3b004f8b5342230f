//! The HTTP sink: the client (no redirects, one timeout), the request with its
//! authentication, and what the receiver's answer means: 2xx confirms the batch; 429, 408,
//! 5xx, timeouts and connection errors are worth a retry (`Retry-After` honoured); any other
//! status is a refusal. Error details never show a credential: the URL is shown without its
//! user, password and query, and anything secret the receiver echoes back is scrubbed.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url, redirect};

use super::config::{HttpAuth, HttpParams};
use super::message::{DESTINATION_HEADER, Layout};
use crate::{Delivered, DeliveryError, OutEvent};

/// How much of a refusing or failing response body goes into the error detail.
const SNIPPET_BYTES: usize = 200;
/// How much of a response body is read to find that snippet. More than `SNIPPET_BYTES`, so a
/// credential echoed back across the cut is still whole when it is scrubbed.
const SNIPPET_READ_BYTES: usize = 4096;
/// How much of a successful response body is drained so the connection can be reused.
const DRAIN_BYTES: usize = 64 * 1024;

/// A webhook destination. Holds a connection pool; cheap to keep for the life of the relay.
pub struct HttpSink {
    name: String,
    client: Client,
    url: Url,
    /// The URL without credentials, query or fragment: what error details show.
    target: String,
    /// How a batch becomes a body and its headers (format, limits, signing secret).
    layout: Layout,
    /// The configured custom headers plus `X-Auditbridge-Destination`.
    headers: HeaderMap,
    auth: Option<HttpAuth>,
    /// Strings that must never appear in an error detail (token, password, secret, and the
    /// values of custom headers, which often carry API keys).
    redact: Vec<String>,
}

// Written by hand: the derived one would print the token, the password and the secret.
impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("format", &self.layout.format)
            .field("max_batch_events", &self.layout.max_batch_events)
            .field("max_batch_bytes", &self.layout.max_batch_bytes)
            .field(
                "auth",
                &self.auth.as_ref().map(|a| match a {
                    HttpAuth::Bearer(_) => "bearer",
                    HttpAuth::Basic { .. } => "basic",
                }),
            )
            .field("signed", &self.layout.secret.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// Builds the client (no I/O: the first `deliver` connects). Fails only on settings the
    /// config validation let through but HTTP cannot carry (an unparsable URL, a header value
    /// with non-visible bytes).
    pub fn new(name: &str, params: HttpParams) -> Result<HttpSink, DeliveryError> {
        let refuse = |setting: &str, message: String| DeliveryError::Refused {
            reason: "config",
            detail: format!("destination {name}: {setting}: {message}"),
        };
        let url = Url::parse(&params.url)
            .map_err(|e| refuse("params.url", format!("not a valid URL: {e}")))?;
        let target = redacted(&url);

        let mut headers = HeaderMap::new();
        let mut redact = Vec::new();
        for (key, value) in &params.headers {
            let header_name = HeaderName::from_bytes(key.as_bytes()).map_err(|_| {
                refuse(
                    &format!("params.headers.{key}"),
                    "not a valid header name".into(),
                )
            })?;
            // The value is not quoted in the error: it may be an API key.
            let mut header_value = HeaderValue::from_str(value).map_err(|_| {
                refuse(
                    &format!("params.headers.{key}"),
                    "the value has bytes a header cannot carry".into(),
                )
            })?;
            header_value.set_sensitive(true);
            // Configured auth wins over a hand-written Authorization header.
            if params.auth.is_some() && header_name == reqwest::header::AUTHORIZATION {
                continue;
            }
            headers.append(header_name, header_value);
            if value.len() >= 4 {
                redact.push(value.clone());
            }
        }
        let destination = HeaderValue::from_str(name)
            .map_err(|_| refuse("name", "cannot be sent as a header value".into()))?;
        headers.insert(DESTINATION_HEADER, destination);

        match &params.auth {
            Some(HttpAuth::Bearer(token)) => redact.push(token.clone()),
            Some(HttpAuth::Basic { password, .. }) => redact.push(password.clone()),
            None => {}
        }
        if let Some(secret) = &params.secret {
            redact.push(secret.clone());
        }
        redact.retain(|s| !s.is_empty());
        // Longest first, so a secret that contains another is scrubbed whole.
        redact.sort_by_key(|s| std::cmp::Reverse(s.len()));

        let client = Client::builder()
            .timeout(params.timeout)
            .connect_timeout(params.timeout)
            // A redirect is a configuration problem to report, not to follow: following it
            // would resend the events (and the credentials) to a host nobody configured.
            .redirect(redirect::Policy::none())
            .build()
            .map_err(|e| {
                refuse(
                    "params",
                    format!("cannot build the HTTP client: {}", chain(&e)),
                )
            })?;

        Ok(HttpSink {
            name: name.to_owned(),
            client,
            url,
            target,
            layout: Layout {
                format: params.format,
                max_batch_events: params.max_batch_events.max(1),
                max_batch_bytes: params.max_batch_bytes,
                secret: params.secret,
            },
            headers,
            auth: params.auth,
            redact,
        })
    }

    /// Sends the longest prefix of `events` that fits the batch limits (at least one event, even
    /// one larger than `max_batch_bytes`) in one POST and returns its length once the receiver
    /// answered 2xx.
    pub async fn deliver(&mut self, events: &[OutEvent]) -> Result<Delivered, DeliveryError> {
        if events.is_empty() {
            return Ok(Delivered::default());
        }
        let n = self.layout.batch_len(events);
        let batch = &events[..n];
        let body = self.layout.body(batch);
        let body_len = body.len();

        let mut headers = self.headers.clone();
        self.layout.describe(&mut headers, batch, &body);

        let mut request = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body);
        request = match &self.auth {
            Some(HttpAuth::Bearer(token)) => request.bearer_auth(token),
            Some(HttpAuth::Basic { username, password }) => {
                request.basic_auth(username, Some(password))
            }
            None => request,
        };

        let mut response = request.send().await.map_err(|e| self.send_error(e))?;
        let status = response.status();
        if status.is_success() {
            // Read what is left so the connection goes back to the pool. The receiver has
            // already accepted the batch, so a failure here changes nothing.
            let mut drained = 0;
            while drained < DRAIN_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => drained += chunk.len(),
                    Ok(None) | Err(_) => break,
                }
            }
            tracing::debug!(destination = %self.name, events = n, bytes = body_len, status = status.as_u16(), message = "Delivered a batch.");
            return Ok(Delivered::confirmed(n));
        }

        let retry_after = retry_after(response.headers());
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| self.scrub(v));
        let snippet = self.snippet(&mut response).await;
        let mut detail = format!("POST {} answered {status}", self.target);
        if status.is_redirection() {
            detail.push_str(" (redirects are not followed");
            if let Some(location) = location {
                detail.push_str(&format!("; Location: {location:?}"));
            }
            detail.push(')');
        }
        if !snippet.is_empty() {
            detail.push_str(&format!(": {snippet:?}"));
        }
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS => DeliveryError::Retry {
                reason: "status_429",
                detail,
                retry_after,
            },
            StatusCode::REQUEST_TIMEOUT => DeliveryError::Retry {
                reason: "timeout",
                detail,
                retry_after,
            },
            s if s.is_server_error() => DeliveryError::Retry {
                reason: "status_5xx",
                detail,
                retry_after,
            },
            s if s.is_redirection() => DeliveryError::Refused {
                reason: "status_3xx",
                detail,
            },
            _ => DeliveryError::Refused {
                reason: "status_4xx",
                detail,
            },
        })
    }

    fn send_error(&self, error: reqwest::Error) -> DeliveryError {
        // A connect timeout is both; it is reported as a timeout.
        let reason = if error.is_timeout() {
            "timeout"
        } else if error.is_connect() {
            "connect"
        } else {
            "request"
        };
        DeliveryError::Retry {
            reason,
            // reqwest's message would show the whole URL; the redacted one is shown instead.
            detail: self.scrub(&format!(
                "POST {}: {}",
                self.target,
                chain(&error.without_url())
            )),
            retry_after: None,
        }
    }

    /// The start of a response body, with anything secret the receiver echoed back removed.
    async fn snippet(&self, response: &mut reqwest::Response) -> String {
        let mut raw = Vec::new();
        while raw.len() < SNIPPET_READ_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => raw.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        raw.truncate(SNIPPET_READ_BYTES);
        let text = self.scrub(String::from_utf8_lossy(&raw).trim());
        let mut cut = text.len().min(SNIPPET_BYTES);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text[..cut].to_owned()
    }

    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.redact {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "[redacted]");
            }
        }
        text
    }
}

/// `Retry-After` as delta-seconds or as an HTTP-date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The URL as error details show it: no user, password, query or fragment, which may all
/// carry credentials.
fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// An error and its sources, joined with ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap as AxHeaderMap, Method, StatusCode as AxStatus, Uri};
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;
    use crate::http::HttpFormat;
    use crate::http::message::{sign, unix_now, verify};

    /// One request as the test server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        headers: AxHeaderMap,
        body: Bytes,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).map(|v| v.to_str().unwrap())
        }
    }

    /// What the test server answers to the next request (200 once the script runs out).
    #[derive(Clone)]
    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    }

    impl Reply {
        fn status(status: u16) -> Reply {
            Reply {
                status,
                headers: Vec::new(),
                body: String::new(),
                delay: Duration::ZERO,
            }
        }
        fn header(mut self, name: &'static str, value: &str) -> Reply {
            self.headers.push((name, value.to_owned()));
            self
        }
        fn body(mut self, body: &str) -> Reply {
            self.body = body.to_owned();
            self
        }
        fn delay(mut self, delay: Duration) -> Reply {
            self.delay = delay;
            self
        }
    }

    #[derive(Default)]
    struct Shared {
        seen: Mutex<Vec<Seen>>,
        script: Mutex<VecDeque<Reply>>,
    }

    struct Server {
        addr: SocketAddr,
        shared: Arc<Shared>,
    }

    impl Server {
        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }
        fn seen(&self) -> Vec<Seen> {
            self.shared.seen.lock().unwrap().clone()
        }
    }

    async fn record(
        State(shared): State<Arc<Shared>>,
        method: Method,
        uri: Uri,
        headers: AxHeaderMap,
        body: Bytes,
    ) -> Response {
        shared.seen.lock().unwrap().push(Seen {
            method,
            path: uri.path().to_owned(),
            headers,
            body,
        });
        let reply = shared
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Reply::status(200));
        tokio::time::sleep(reply.delay).await;
        let mut response = (AxStatus::from_u16(reply.status).unwrap(), reply.body).into_response();
        for (name, value) in reply.headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        response
    }

    /// A real HTTP server on 127.0.0.1:0 that records every request and answers from `script`.
    async fn server(script: Vec<Reply>) -> Server {
        let shared = Arc::new(Shared {
            seen: Mutex::default(),
            script: Mutex::new(script.into()),
        });
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { addr, shared }
    }

    fn params(url: String) -> HttpParams {
        HttpParams {
            url,
            format: HttpFormat::Ndjson,
            max_batch_events: 500,
            max_batch_bytes: 1024 * 1024,
            headers: Vec::new(),
            auth: None,
            timeout: Duration::from_secs(5),
            secret: None,
        }
    }

    /// An event whose JSON is exactly `len` bytes long (at least ~120).
    fn event(len: usize) -> OutEvent {
        let id = Uuid::now_v7();
        let mut value = json!({"id": id, "tenant": "acme", "action": "user.login", "outcome": "success", "pad": ""});
        let short = value.to_string().len();
        assert!(len >= short, "an event is at least {short} bytes");
        value["pad"] = Value::String("x".repeat(len - short));
        let json = value.to_string();
        assert_eq!(json.len(), len);
        OutEvent {
            id,
            tenant: "acme".into(),
            action: "user.login".into(),
            outcome: "success".into(),
            source: "auth".into(),
            received_at: OffsetDateTime::now_utc(),
            json,
        }
    }

    fn events(n: usize, len: usize) -> Vec<OutEvent> {
        (0..n).map(|_| event(len)).collect()
    }

    fn values(events: &[OutEvent]) -> Vec<Value> {
        events
            .iter()
            .map(|e| serde_json::from_str(&e.json).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ndjson_batches_carry_events_headers_and_bearer_auth() {
        let server = server(vec![]).await;
        let mut p = params(server.url("/in"));
        p.headers = vec![("X-Source".into(), "auditbridge-test".into())];
        p.auth = Some(HttpAuth::Bearer("tok-123".into()));
        let mut sink = HttpSink::new("siem", p).unwrap();
        let batch = events(3, 150);

        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(3));

        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        let req = &seen[0];
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.path, "/in");
        assert_eq!(req.header("content-type"), Some("application/x-ndjson"));
        assert_eq!(req.header("x-source"), Some("auditbridge-test"));
        assert_eq!(req.header("authorization"), Some("Bearer tok-123"));
        assert_eq!(req.header("x-auditbridge-destination"), Some("siem"));
        assert_eq!(req.header("x-auditbridge-count"), Some("3"));
        let key = format!("{}..{}", batch[0].id, batch[2].id);
        assert_eq!(req.header("idempotency-key"), Some(key.as_str()));
        // No secret, no signature.
        assert_eq!(req.header("x-auditbridge-timestamp"), None);
        assert_eq!(req.header("x-auditbridge-signature"), None);

        let body = std::str::from_utf8(&req.body).unwrap();
        assert!(body.ends_with('\n'));
        let got: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got, values(&batch));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn json_array_batches_parse_back_and_carry_basic_auth() {
        let server = server(vec![Reply::status(202)]).await;
        let mut p = params(server.url("/hook"));
        p.format = HttpFormat::JsonArray;
        // The example from RFC 7617.
        p.auth = Some(HttpAuth::Basic {
            username: "Aladdin".into(),
            password: "open sesame".into(),
        });
        let mut sink = HttpSink::new("array", p).unwrap();
        let batch = events(4, 130);

        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(4));

        let req = &server.seen()[0];
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(
            req.header("authorization"),
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        );
        assert_eq!(req.header("x-auditbridge-count"), Some("4"));
        let got: Vec<Value> = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(got, values(&batch));
        let expected = format!(
            "[{}]",
            batch
                .iter()
                .map(|e| e.json.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(req.body, expected.as_bytes());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_limits_cut_the_prefix_but_a_lone_oversized_event_still_goes() {
        let server = server(vec![]).await;
        let batch = events(5, 200);

        // By count.
        let mut p = params(server.url("/"));
        p.max_batch_events = 2;
        let mut sink = HttpSink::new("count", p).unwrap();
        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(2));

        // By bytes, NDJSON: three events take 3 × 201 = 603 bytes, four would take 804.
        let mut p = params(server.url("/"));
        p.max_batch_bytes = 700;
        let mut sink = HttpSink::new("bytes", p).unwrap();
        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(3));

        // By bytes, JSON array, an exact fit: "[" + 3 × 200 + 2 commas + "]" = 604.
        let mut p = params(server.url("/"));
        p.format = HttpFormat::JsonArray;
        p.max_batch_bytes = 604;
        let mut sink = HttpSink::new("exact", p).unwrap();
        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(3));

        // One event larger than the limit goes alone, and only it.
        let mut big = vec![event(2000)];
        big.extend(events(2, 150));
        let mut p = params(server.url("/"));
        p.max_batch_bytes = 1024;
        let mut sink = HttpSink::new("big", p).unwrap();
        assert_eq!(sink.deliver(&big).await.unwrap(), Delivered::confirmed(1));

        let seen = server.seen();
        let counts: Vec<_> = seen
            .iter()
            .map(|r| r.header("x-auditbridge-count").unwrap().to_owned())
            .collect();
        assert_eq!(counts, ["2", "3", "3", "1"]);
        assert_eq!(
            seen[0].body,
            format!("{}\n{}\n", batch[0].json, batch[1].json).as_bytes()
        );
        assert_eq!(seen[1].body.len(), 603);
        assert_eq!(seen[2].body.len(), 604);
        assert_eq!(seen[3].body, format!("{}\n", big[0].json).as_bytes());
        let key = format!("{}..{}", big[0].id, big[0].id);
        assert_eq!(seen[3].header("idempotency-key"), Some(key.as_str()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signed_requests_verify_on_the_raw_body() {
        let server = server(vec![]).await;
        let mut p = params(server.url("/signed"));
        p.secret = Some("whsec-test".into());
        let mut sink = HttpSink::new("signed", p).unwrap();
        let batch = events(2, 140);

        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(2));

        let req = &server.seen()[0];
        let timestamp: u64 = req
            .header("x-auditbridge-timestamp")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            unix_now().abs_diff(timestamp) <= 5,
            "timestamp {timestamp} is not now"
        );
        let signature = req.header("x-auditbridge-signature").unwrap();
        assert!(signature.starts_with("v1="));
        assert_eq!(signature.len(), 3 + 64);
        assert!(
            signature[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(signature, sign(b"whsec-test", timestamp, &req.body));

        assert!(verify(b"whsec-test", timestamp, &req.body, signature));
        let mut altered = req.body.to_vec();
        altered[5] ^= 1;
        assert!(!verify(b"whsec-test", timestamp, &altered, signature));
        assert!(!verify(b"whsec-test", timestamp + 1, &req.body, signature));
        assert!(!verify(b"whsec-other", timestamp, &req.body, signature));
        assert!(!verify(
            b"whsec-test",
            timestamp,
            &req.body,
            &signature[3..]
        ));
        assert!(!verify(b"whsec-test", timestamp, &req.body, "v1=zz"));
    }

    async fn fail_with(reply: Reply) -> (DeliveryError, Server) {
        let server = server(vec![reply]).await;
        let mut sink = HttpSink::new("siem", params(server.url("/in"))).unwrap();
        let error = sink.deliver(&events(2, 130)).await.unwrap_err();
        (error, server)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_errors_and_throttling_are_retried() {
        let (e, _s) = fail_with(Reply::status(500).body("database down")).await;
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "status_5xx",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("500") && e.to_string().contains("database down"),
            "{e}"
        );

        let (e, _s) = fail_with(
            Reply::status(429)
                .header("retry-after", "7")
                .body("slow down"),
        )
        .await;
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "status_429",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(
            e.to_string().contains("429") && e.to_string().contains("slow down"),
            "{e}"
        );

        let when = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let (e, _s) = fail_with(Reply::status(503).header("retry-after", &when)).await;
        assert_eq!(e.reason(), "status_5xx");
        let after = e.retry_after().unwrap();
        assert!(
            after > Duration::from_secs(100) && after <= Duration::from_secs(120),
            "{after:?}"
        );

        let (e, _s) = fail_with(Reply::status(408)).await;
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "timeout",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_errors_and_redirects_are_refused() {
        let (e, _s) = fail_with(Reply::status(404)).await;
        assert!(
            matches!(
                e,
                DeliveryError::Refused {
                    reason: "status_4xx",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("404"), "{e}");

        let long = format!("bad field tenant{}", "y".repeat(1000));
        let (e, _s) = fail_with(Reply::status(400).body(&long)).await;
        assert!(
            matches!(
                e,
                DeliveryError::Refused {
                    reason: "status_4xx",
                    ..
                }
            ),
            "{e:?}"
        );
        let detail = e.to_string();
        assert!(
            detail.contains("400") && detail.contains("bad field tenant"),
            "{detail}"
        );
        assert!(
            !detail.contains(&"y".repeat(SNIPPET_BYTES)),
            "the body is cut to {SNIPPET_BYTES} bytes: {detail}"
        );

        let server = server(vec![Reply::status(302).header("location", "/elsewhere")]).await;
        let mut sink = HttpSink::new("siem", params(server.url("/in"))).unwrap();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert!(
            matches!(
                e,
                DeliveryError::Refused {
                    reason: "status_3xx",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("302") && e.to_string().contains("/elsewhere"),
            "{e}"
        );
        let paths: Vec<_> = server.seen().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/in"], "the redirect was not followed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_receiver_times_out() {
        let server = server(vec![Reply::status(200).delay(Duration::from_secs(5))]).await;
        let mut p = params(server.url("/slow"));
        p.timeout = Duration::from_millis(300);
        let mut sink = HttpSink::new("slow", p).unwrap();

        let started = Instant::now();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "timeout",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_port_is_a_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut sink =
            HttpSink::new("gone", params(format!("http://127.0.0.1:{port}/in"))).unwrap();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "connect",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn credentials_stay_out_of_errors_and_debug_output() {
        // A receiver that echoes the credentials back in its refusal.
        let server =
            server(vec![Reply::status(401).body(
                "bad token tok-secret-123 / whsec-hidden / key-hidden-9",
            )])
            .await;
        let mut p = params(server.url("/in?api_key=query-hidden"));
        p.auth = Some(HttpAuth::Bearer("tok-secret-123".into()));
        p.secret = Some("whsec-hidden".into());
        p.headers = vec![("X-Api-Key".into(), "key-hidden-9".into())];
        let mut sink = HttpSink::new("siem", p).unwrap();

        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert_eq!(e.reason(), "status_4xx");
        let shown = format!("{e} {e:?} {sink:?}");
        for hidden in [
            "tok-secret-123",
            "whsec-hidden",
            "key-hidden-9",
            "query-hidden",
        ] {
            assert!(!shown.contains(hidden), "{hidden} leaked: {shown}");
        }
        assert!(shown.contains("bad token [redacted]"), "{shown}");

        let mut p = params("http://user:pw-hidden@127.0.0.1:1/in".into());
        p.auth = Some(HttpAuth::Basic {
            username: "u".into(),
            password: "basic-hidden".into(),
        });
        let mut sink = HttpSink::new("siem", p).unwrap();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        let shown = format!("{e} {e:?} {sink:?}");
        assert!(
            !shown.contains("pw-hidden") && !shown.contains("basic-hidden"),
            "{shown}"
        );
    }
}
