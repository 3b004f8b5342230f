//! The `http` destination's parameters (the `params` of a `type = "http"` definition, besides
//! the common ones) and their validation. The URL, the header names and values and the bearer
//! token are checked by the parsers the sink uses, so a definition that loads is one the sink
//! can build.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, duration, err, redact_url, type_params};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpFormat {
    Ndjson,
    JsonArray,
}

#[derive(Clone, PartialEq)]
pub enum HttpAuth {
    Bearer(String),
    Basic { username: String, password: String },
}

#[derive(Clone, PartialEq)]
pub struct HttpParams {
    pub url: String,
    pub format: HttpFormat,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    pub headers: Vec<(String, String)>,
    pub auth: Option<HttpAuth>,
    pub timeout: Duration,
    /// When set, requests carry an HMAC-SHA256 signature of `timestamp + "." + body`.
    pub secret: Option<String>,
}

// Debug by hand for everything that holds a credential, so that logging a configuration
// never prints a token, a password or a signing secret.

impl fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpAuth::Bearer(_) => f.write_str("Bearer(***)"),
            HttpAuth::Basic { username, .. } => write!(f, "Basic({username}:***)"),
        }
    }
}

impl fmt::Debug for HttpParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpParams")
            .field("url", &redact_url(&self.url))
            .field("format", &self.format)
            .field("max_batch_events", &self.max_batch_events)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    url: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    max_batch_events: Option<usize>,
    #[serde(default)]
    max_batch_bytes: Option<usize>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    bearer_token: Option<String>,
    #[serde(default)]
    basic_auth: Option<RawBasic>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasic {
    username: String,
    password: String,
}
/// Reads and checks the parameters of destination `name`, the common ones taken out.
pub(crate) fn parse_params(
    name: &str,
    params: serde_json::Value,
) -> Result<HttpParams, ConfigError> {
    let h: RawHttp = type_params(name, params)?;
    // The parser the sink uses (reqwest's `Url`), so a URL that loads is one it can use.
    let url_ok = (h.url.starts_with("http://") || h.url.starts_with("https://"))
        && reqwest::Url::parse(&h.url).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()));
    if !url_ok {
        return Err(err(
            name,
            "params.url",
            format!(
                "expected an http:// or https:// URL with a host, got {:?}",
                redact_url(&h.url)
            ),
        ));
    }
    let format = match h.format.as_deref().unwrap_or("ndjson") {
        "ndjson" => HttpFormat::Ndjson,
        "json_array" => HttpFormat::JsonArray,
        other => {
            return Err(err(
                name,
                "params.format",
                format!("expected \"ndjson\" or \"json_array\", got {other:?}"),
            ));
        }
    };
    if let Some(token) = &h.bearer_token
        && reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).is_err()
    {
        return Err(err(
            name,
            "params.bearer_token",
            "expected no control characters (it is sent in the Authorization header)",
        ));
    }
    let auth = match (h.bearer_token, h.basic_auth) {
        (Some(_), Some(_)) => {
            return Err(err(
                name,
                "params.bearer_token",
                "set either bearer_token or basic_auth, not both",
            ));
        }
        (Some(t), None) => Some(HttpAuth::Bearer(t)),
        (None, Some(b)) => Some(HttpAuth::Basic {
            username: b.username,
            password: b.password,
        }),
        (None, None) => None,
    };
    for (k, v) in &h.headers {
        // The name by our own (narrower) rule, the value by the parser the sink uses.
        let ok = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            && reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
            && reqwest::header::HeaderValue::from_str(v).is_ok();
        if !ok {
            // The value is not quoted: it may be an API key.
            return Err(err(
                name,
                &format!("params.headers.{k}"),
                "expected a header name of letters, digits, '-' or '_' and a value without control characters",
            ));
        }
    }
    if h.secret.as_deref().is_some_and(str::is_empty) {
        return Err(err(name, "params.secret", "must not be empty when set"));
    }
    let max_batch_events = h.max_batch_events.unwrap_or(500);
    if max_batch_events == 0 || max_batch_events > 100_000 {
        return Err(err(name, "params.max_batch_events", "expected 1 to 100000"));
    }
    let max_batch_bytes = h.max_batch_bytes.unwrap_or(1024 * 1024);
    if max_batch_bytes < 1024 {
        return Err(err(
            name,
            "params.max_batch_bytes",
            "expected at least 1024",
        ));
    }
    Ok(HttpParams {
        url: h.url,
        format,
        max_batch_events,
        max_batch_bytes,
        headers: h.headers.into_iter().collect(),
        auth,
        timeout: duration(
            name,
            "params.timeout",
            h.timeout.as_deref(),
            Duration::from_secs(10),
        )?,
        secret: h.secret,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::config::tests::one;
    use crate::{Kind, OnUndeliverable, Start};

    #[test]
    fn http_defaults() {
        let d = one(
            json!({"name": "siem", "type": "http", "params": {"url": "http://127.0.0.1:9/in"}}),
        )
        .unwrap();
        assert_eq!(d.start, Start::Now);
        assert_eq!(d.max_backlog_age, None);
        let Kind::Http(h) = d.kind else { panic!() };
        assert_eq!(h.format, HttpFormat::Ndjson);
        assert_eq!(h.max_batch_events, 500);
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert_eq!(h.auth, None);
        assert_eq!(d.on_undeliverable, OnUndeliverable::DeadLetter);
        let d = one(json!({"name": "siem", "type": "http", "params": {
            "url": "http://127.0.0.1:9/in", "on_undeliverable": "block"}}))
        .unwrap();
        assert_eq!(d.on_undeliverable, OnUndeliverable::Block);
    }
}
