//! One request to a polled API: the client (no redirects, one timeout), the credentials
//! (static headers, bearer, basic, or an OAuth 2 client-credentials token refreshed before it
//! expires), the body read up to the page limit, and what the response says about when to
//! ask again (`Retry-After`, the rate-limit headers).

use std::time::{Duration, Instant, SystemTime};

use auditbridge_config::ExposeSecret as _;
use auditbridge_config::api_source::{ApiAuth, ApiParams, OAuth2, ResetStyle};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url, redirect};
use tokio::sync::Mutex;

/// What went wrong with a request, by what the poller does about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    /// 401 or 403: the API refused our credentials. The source is marked failing and retried
    /// slowly.
    #[error("the API refused the credentials: HTTP {status}{body}")]
    Auth { status: u16, body: String },
    /// 429, or 503 with `Retry-After`: wait as long as it says.
    #[error("HTTP {status}: rate limited{}", after.map(|d| format!(", retry after {d:?}")).unwrap_or_default())]
    RateLimited {
        status: u16,
        after: Option<Duration>,
    },
    /// Another status: 5xx are the API's trouble, 4xx most likely ours (a wrong URL or
    /// parameter); both back off.
    #[error("HTTP {status}{body}")]
    Status { status: u16, body: String },
    #[error(
        "redirected (HTTP {status}) to {location}: redirects are not followed, configure the URL they point to"
    )]
    Redirect { status: u16, location: String },
    #[error("{0}")]
    Network(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("the page is larger than params.max_page_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error("the OAuth 2 token endpoint: {0}")]
    OAuth(String),
}

impl FetchError {
    /// The `kind` label of `auditbridge_poll_errors_total` and of `status`.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Auth { .. } => "auth",
            FetchError::RateLimited { status: 429, .. } => "rate_limited",
            FetchError::RateLimited { .. } => "unavailable",
            FetchError::Status { status, .. } if *status >= 500 => "http_5xx",
            FetchError::Status { .. } | FetchError::Redirect { .. } => "http_4xx",
            FetchError::Network(_) => "network",
            FetchError::Timeout(_) => "timeout",
            FetchError::TooLarge(_) => "too_large",
            FetchError::OAuth(_) => "oauth",
        }
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Response {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// How long to wait before the next request so as not to reach the rate limit.
    pub slow_down: Option<Duration>,
}

/// A cached OAuth 2 access token.
struct Token {
    value: String,
    /// Refresh from this instant on.
    refresh_at: Instant,
}

/// The client of one source.
pub struct ApiClient {
    client: Client,
    headers: HeaderMap,
    auth: Option<ApiAuth>,
    token: Mutex<Option<Token>>,
    timeout: Duration,
    max_page_bytes: usize,
    reset: ResetStyle,
    /// Secrets to scrub from error details.
    redact: Vec<String>,
}

impl ApiClient {
    pub fn new(params: &ApiParams) -> Result<ApiClient, String> {
        let mut headers = HeaderMap::new();
        let mut redact = Vec::new();
        for (key, value) in &params.headers {
            let name = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| format!("params.headers.{key}: not a valid header name"))?;
            let mut value = HeaderValue::from_str(value.expose_secret()).map_err(|_| {
                format!("params.headers.{key}: the value has bytes a header cannot carry")
            })?;
            value.set_sensitive(true);
            if let Ok(text) = value.to_str()
                && text.len() >= 4
            {
                redact.push(text.to_owned());
            }
            headers.append(name, value);
        }
        headers.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        match &params.auth {
            Some(ApiAuth::Bearer(t)) => redact.push(t.expose_secret().to_owned()),
            Some(ApiAuth::Basic { password, .. }) => {
                redact.push(password.expose_secret().to_owned());
            }
            Some(ApiAuth::OAuth2(o)) => redact.push(o.client_secret.expose_secret().to_owned()),
            None => {}
        }
        redact.retain(|s| s.len() >= 4);
        redact.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let client = Client::builder()
            .timeout(params.timeout)
            .connect_timeout(params.timeout)
            // A redirect would carry the credentials (custom headers too) to wherever the
            // API, or whoever answers in its name, points: reported, not followed.
            .redirect(redirect::Policy::none())
            .user_agent(concat!("auditbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(ApiClient {
            client,
            headers,
            auth: params.auth.clone(),
            token: Mutex::new(None),
            timeout: params.timeout,
            max_page_bytes: params.max_page_bytes,
            reset: params.rate_limit_reset,
            redact,
        })
    }

    /// GETs `url` with the source's credentials and reads the body up to the page limit. A
    /// 401 with OAuth 2 fetches a new token and tries once more.
    pub async fn get(&self, url: &Url) -> Result<Response, FetchError> {
        let mut retried = false;
        loop {
            let mut request = self.client.get(url.clone()).headers(self.headers.clone());
            match &self.auth {
                Some(ApiAuth::Bearer(t)) => request = request.bearer_auth(t.expose_secret()),
                Some(ApiAuth::Basic { username, password }) => {
                    request = request.basic_auth(username, Some(password.expose_secret()));
                }
                Some(ApiAuth::OAuth2(o)) => {
                    let token = self.oauth_token(o).await?;
                    request = request.bearer_auth(token);
                }
                None => {}
            }
            let started = Instant::now();
            let response = request.send().await.map_err(|e| self.send_error(&e))?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED
                && matches!(self.auth, Some(ApiAuth::OAuth2(_)))
                && !retried
            {
                // The token may have been revoked or expired early.
                *self.token.lock().await = None;
                retried = true;
                continue;
            }
            return self.read(response, started).await;
        }
    }

    async fn read(
        &self,
        mut response: reqwest::Response,
        started: Instant,
    ) -> Result<Response, FetchError> {
        let status = response.status();
        let headers = response.headers().clone();
        if status.is_redirection() {
            let location = headers
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(crate::poll::shown_url_text)
                .unwrap_or_else(|| "(no Location)".into());
            return Err(FetchError::Redirect {
                status: status.as_u16(),
                location,
            });
        }
        if !status.is_success() {
            let after = retry_after(&headers);
            let body = self.snippet(&mut response).await;
            return Err(match status.as_u16() {
                401 | 403 => FetchError::Auth {
                    status: status.as_u16(),
                    body,
                },
                429 => FetchError::RateLimited {
                    status: 429,
                    after: after.or_else(|| self.until_reset(&headers)),
                },
                503 if after.is_some() => FetchError::RateLimited { status: 503, after },
                s => FetchError::Status { status: s, body },
            });
        }
        if let Some(length) = response.content_length()
            && length > self.max_page_bytes as u64
        {
            return Err(FetchError::TooLarge(self.max_page_bytes));
        }
        let mut body = Vec::new();
        loop {
            let chunk = tokio::time::timeout(
                self.timeout.saturating_sub(started.elapsed()),
                response.chunk(),
            )
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
            .map_err(|e| self.send_error(&e))?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > self.max_page_bytes {
                return Err(FetchError::TooLarge(self.max_page_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        let slow_down = self.slow_down(&headers);
        Ok(Response {
            headers,
            body,
            slow_down,
        })
    }

    /// A current OAuth 2 access token, fetched (client credentials grant, RFC 6749 §4.4,
    /// the client authenticated with HTTP Basic as §2.3.1 prefers) when there is none or it
    /// expires within a minute or a tenth of its lifetime.
    async fn oauth_token(&self, o: &OAuth2) -> Result<String, FetchError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let url = Url::parse(o.token_url.expose())
            .map_err(|e| FetchError::OAuth(format!("token_url: {e}")))?;
        let mut form = vec![("grant_type", "client_credentials".to_owned())];
        if !o.scopes.is_empty() {
            form.push(("scope", o.scopes.join(" ")));
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .client
            .post(url)
            .basic_auth(
                form_encode(&o.client_id),
                Some(form_encode(o.client_secret.expose_secret())),
            )
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| FetchError::OAuth(self.scrub(&chain(&e))))?;
        let status = response.status();
        let text = tokio::time::timeout(self.timeout, response.text())
            .await
            .map_err(|_| FetchError::OAuth("no answer in time".into()))?
            .map_err(|e| FetchError::OAuth(self.scrub(&chain(&e))))?;
        if !status.is_success() {
            return Err(FetchError::OAuth(format!(
                "HTTP {}: {}",
                status.as_u16(),
                self.scrub(&clip(&text, 300))
            )));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            access_token: String,
            #[serde(default)]
            token_type: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let answer: Answer = serde_json::from_str(&text)
            .map_err(|e| FetchError::OAuth(format!("not a token response (RFC 6749 §5.1): {e}")))?;
        if answer
            .token_type
            .as_deref()
            .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
        {
            return Err(FetchError::OAuth(format!(
                "token_type {:?} is not bearer",
                answer.token_type.unwrap_or_default()
            )));
        }
        if HeaderValue::from_str(&format!("Bearer {}", answer.access_token)).is_err()
            || answer.access_token.is_empty()
        {
            return Err(FetchError::OAuth(
                "the access token cannot be sent in a header".into(),
            ));
        }
        // No expires_in: assume an hour, as common servers issue, refreshed well before.
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600).min(86_400));
        let early = (lifetime / 10)
            .max(Duration::from_secs(60))
            .min(lifetime / 2);
        let value = answer.access_token;
        *cached = Some(Token {
            value: value.clone(),
            refresh_at: Instant::now() + lifetime - early,
        });
        Ok(value)
    }

    /// Before the limit is reached: with `remaining` requests left until the reset, spread
    /// them out once fewer than a tenth of the limit (or than 5) remain; none left: wait for
    /// the reset.
    fn slow_down(&self, headers: &HeaderMap) -> Option<Duration> {
        let remaining = rate_header(headers, "remaining")?;
        let until_reset = self.until_reset(headers)?;
        let limit = rate_header(headers, "limit");
        let low = limit.map_or(5, |l| (l / 10).max(5));
        if remaining == 0 {
            return Some(until_reset);
        }
        (remaining < low).then(|| until_reset / (remaining as u32 + 1))
    }

    /// The rate limit's reset as a wait from now, read as the source says (epoch seconds or
    /// seconds from now), at most an hour.
    fn until_reset(&self, headers: &HeaderMap) -> Option<Duration> {
        let reset = rate_header(headers, "reset")?;
        let wait = match self.reset {
            ResetStyle::Delta => Duration::from_secs(reset),
            ResetStyle::Epoch => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                Duration::from_secs(reset.saturating_sub(now))
            }
        };
        Some(wait.min(MAX_WAIT))
    }

    fn send_error(&self, e: &reqwest::Error) -> FetchError {
        if e.is_timeout() {
            FetchError::Timeout(self.timeout)
        } else {
            FetchError::Network(self.scrub(&chain(e)))
        }
    }

    /// The start of an error body, for the error detail; secrets scrubbed.
    async fn snippet(&self, response: &mut reqwest::Response) -> String {
        let mut text = Vec::new();
        while text.len() < 600 {
            match tokio::time::timeout(Duration::from_secs(2), response.chunk()).await {
                Ok(Ok(Some(c))) => text.extend_from_slice(&c),
                _ => break,
            }
        }
        text.truncate(600);
        let shown = clip(&String::from_utf8_lossy(&text), 300);
        if shown.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", self.scrub(shown.trim()))
        }
    }

    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for s in &self.redact {
            text = text.replace(s.as_str(), "[redacted]");
        }
        text
    }
}

/// The longest any header makes the poller wait.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// `Retry-After` as seconds or an HTTP date, at most [`MAX_WAIT`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_WAIT))
}

/// `X-Rate-Limit-<what>` (Okta) or `X-RateLimit-<what>` (GitHub and many others) as a
/// number.
fn rate_header(headers: &HeaderMap, what: &str) -> Option<u64> {
    [
        format!("x-rate-limit-{what}"),
        format!("x-ratelimit-{what}"),
    ]
    .iter()
    .find_map(|name| headers.get(name.as_str()))
    .and_then(|v| v.to_str().ok())
    .and_then(|v| v.trim().parse().ok())
}

/// `application/x-www-form-urlencoded` of one value.
fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// An error and its sources, joined with ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_bounded() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "999999")])),
            Some(MAX_WAIT)
        );
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let d = retry_after(&headers(&[("retry-after", &soon)])).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn rate_limit_headers_of_both_spellings() {
        let h = headers(&[
            ("x-rate-limit-remaining", "3"),
            ("x-ratelimit-limit", "100"),
        ]);
        assert_eq!(rate_header(&h, "remaining"), Some(3));
        assert_eq!(rate_header(&h, "limit"), Some(100));
        assert_eq!(rate_header(&h, "reset"), None);
    }
}
