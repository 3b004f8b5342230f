//! The HTTP sink: the client (no redirects, one timeout), the request with its
//! authentication, and what the receiver's answer means: 2xx confirms the batch; 429, 408,
//! 5xx, timeouts and connection errors are worth a retry (`Retry-After` honoured); any other
//! status is a refusal. Error details never show a credential: the URL is shown without its
//! user, password and query, and anything secret the receiver echoes back is scrubbed.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url, redirect};

use auditbridge_config::ExposeSecret as _;

use super::message::{DESTINATION_HEADER, Layout};
use super::{HttpAuth, HttpParams};
use crate::{Delivered, DeliveryError, StoredEvent};

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
                    HttpAuth::Splunk(_) => "splunk",
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
        let url = Url::parse(params.url.expose())
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
            let mut header_value = HeaderValue::from_str(value.expose_secret()).map_err(|_| {
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
            if value.expose_secret().len() >= 4 {
                redact.push(value.expose_secret().to_owned());
            }
        }
        let destination = HeaderValue::from_str(name)
            .map_err(|_| refuse("name", "cannot be sent as a header value".into()))?;
        headers.insert(DESTINATION_HEADER, destination);

        match &params.auth {
            Some(HttpAuth::Bearer(token) | HttpAuth::Splunk(token)) => {
                redact.push(token.expose_secret().to_owned());
            }
            Some(HttpAuth::Basic { password, .. }) => {
                redact.push(password.expose_secret().to_owned());
            }
            None => {}
        }
        if let Some(secret) = &params.secret {
            redact.push(secret.expose_secret().to_owned());
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
    pub async fn deliver(&mut self, events: &[StoredEvent]) -> Result<Delivered, DeliveryError> {
        if events.is_empty() {
            return Ok(Delivered::default());
        }
        let n = self.layout.batch_len(events);
        let batch = &events[..n];
        let body = self.layout.body(batch);
        let body_len = body.len();

        let mut headers = self.headers.clone();
        self.layout.describe(&mut headers, batch, &body);
        let status = self.post(headers, body).await?;
        tracing::debug!(destination = %self.name, events = n, bytes = body_len, status, message = "Delivered a batch.");
        Ok(Delivered::confirmed(n))
    }

    /// Sends one checkpoint (`{"type": "checkpoint", "tenant": …, "note": …}`) in one POST;
    /// done once the receiver answered 2xx.
    pub async fn deliver_checkpoint(
        &mut self,
        checkpoint: &crate::CheckpointMessage,
    ) -> Result<(), DeliveryError> {
        let body = checkpoint.body();
        let mut headers = self.headers.clone();
        self.layout
            .describe_checkpoint(&mut headers, &checkpoint.key(), &body);
        let status = self.post(headers, body).await?;
        tracing::debug!(destination = %self.name, tenant = %checkpoint.tenant, status, message = "Delivered a checkpoint.");
        Ok(())
    }

    /// POSTs `body` with `headers` (and the credentials); the status once it is 2xx, the
    /// failure otherwise.
    async fn post(&self, headers: HeaderMap, body: Vec<u8>) -> Result<u16, DeliveryError> {
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body);
        request = match &self.auth {
            Some(HttpAuth::Bearer(token)) => request.bearer_auth(token.expose_secret()),
            Some(HttpAuth::Splunk(token)) => request.header(
                reqwest::header::AUTHORIZATION,
                format!("Splunk {}", token.expose_secret()),
            ),
            Some(HttpAuth::Basic { username, password }) => {
                request.basic_auth(username, Some(password.expose_secret()))
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
            return Ok(status.as_u16());
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
