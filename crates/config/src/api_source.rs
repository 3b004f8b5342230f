//! `api` sources (`[[sources]]` with `type = "api"`, run by `auditbridge poll`): an audit-log
//! API polled page by page, with a cursor style of three presets (`link`, `token`,
//! `window`), static credentials or OAuth 2 client credentials, and the same mapping and
//! tenant allow-list as webhooks.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Deserializer};

use crate::SecretUrl;
use crate::de::{self, positive_duration};
use crate::destinations::{BasicAuth, check_headers, http_url};
use crate::lists::{Refusal, check_range, check_tenants, refuse};
use crate::sources::{MappingConfig, Pointer};

/// How the poller finds the next page, with the preset's settings resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum CursorStyle {
    /// Follow `Link: <…>; rel="next"` (Okta's System Log); the saved cursor is the next link.
    Link,
    /// A next-page token in the body at `pointer`, sent as the query parameter `param`.
    Token { pointer: String, param: String },
    /// Time windows `[high_water - overlap, now - settle)`, each paged by `Link` or, with
    /// `token`, by a token in the body.
    Window(Window),
}

/// The `window` preset's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub since_param: String,
    pub until_param: String,
    pub time_format: TimeFormat,
    pub overlap: Duration,
    pub settle: Duration,
    /// The first window's start: `None` is the time the source is first polled.
    pub start: Option<time::OffsetDateTime>,
    /// Pages within a window by a token in the body (`token_pointer`, `token_param`).
    pub token: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    #[default]
    Rfc3339,
    Unix,
    UnixMs,
}

/// How a rate-limit reset header is read: Okta and GitHub send the reset's time in epoch
/// seconds, others the seconds until it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetStyle {
    #[default]
    Epoch,
    Delta,
}

/// How requests authenticate.
#[derive(Debug, Clone)]
pub enum ApiAuth {
    Bearer(SecretString),
    Basic {
        username: String,
        password: SecretString,
    },
    /// OAuth 2 client credentials (RFC 6749 §4.4): a token fetched from `token_url`,
    /// refreshed before it expires.
    OAuth2(OAuth2),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2 {
    #[serde(deserialize_with = "http_url")]
    pub token_url: SecretUrl,
    pub client_id: String,
    #[serde(deserialize_with = "de::secret")]
    pub client_secret: SecretString,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// An audit-log API to poll.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiParams {
    /// The first page's URL (the saved cursor takes over once there is one).
    #[serde(deserialize_with = "http_url")]
    pub url: SecretUrl,
    #[serde(rename = "cursor")]
    style_name: StyleName,
    /// Set from `cursor` and the preset's parameters when the definition is read.
    #[serde(skip, default = "unset_style")]
    pub cursor: CursorStyle,
    /// Extra request headers (Okta: `Authorization = "SSWS …"`); their values are secrets.
    #[serde(default, deserialize_with = "de::secret_map")]
    pub headers: BTreeMap<String, SecretString>,
    #[serde(default, deserialize_with = "de::optional_secret")]
    bearer_token: Option<SecretString>,
    #[serde(default, deserialize_with = "optional_basic_auth")]
    basic_auth: Option<BasicAuth>,
    #[serde(default, deserialize_with = "optional_oauth2")]
    oauth2: Option<OAuth2>,
    /// Set from `bearer_token`, `basic_auth` or `oauth2` when the definition is read.
    #[serde(skip)]
    pub auth: Option<ApiAuth>,
    /// Time between polls once a poll reached the newest page.
    #[serde(
        default = "ApiParams::default_interval",
        deserialize_with = "positive_duration::deserialize"
    )]
    pub interval: Duration,
    #[serde(default = "ApiParams::default_page_size")]
    pub page_size: usize,
    /// The query parameter the page size is sent as; `""` sends none.
    #[serde(default = "ApiParams::default_page_size_param")]
    pub page_size_param: String,
    /// JSON pointer to the page's array of events; `""` (the default): the body is the array.
    #[serde(default)]
    pub items: String,
    /// One request, headers and body, may take this long.
    #[serde(
        default = "ApiParams::default_timeout",
        deserialize_with = "positive_duration::deserialize"
    )]
    pub timeout: Duration,
    /// A larger page is refused (read no further) and retried with backoff.
    #[serde(default = "ApiParams::default_max_page_bytes")]
    pub max_page_bytes: usize,
    /// How `X-Rate-Limit-Reset` / `X-RateLimit-Reset` are read.
    #[serde(default)]
    pub rate_limit_reset: ResetStyle,
    #[serde(default)]
    token_pointer: Option<Pointer>,
    #[serde(default)]
    token_param: Option<String>,
    #[serde(default)]
    since_param: Option<String>,
    #[serde(default)]
    until_param: Option<String>,
    #[serde(default)]
    time_format: Option<TimeFormat>,
    #[serde(default, deserialize_with = "optional_duration")]
    overlap: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    settle: Option<Duration>,
    #[serde(default, deserialize_with = "optional_time")]
    start: Option<time::OffsetDateTime>,
    /// Set from `mapping_json` when the definition is read.
    #[serde(skip)]
    pub mapping: MappingConfig,
    #[serde(default, rename = "mapping")]
    pub(crate) mapping_json: Option<serde_json::Value>,
    /// The tenants this source may write (empty: any).
    #[serde(default)]
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StyleName {
    Link,
    Token,
    Window,
}

fn unset_style() -> CursorStyle {
    CursorStyle::Link
}

impl de::Hidden for OAuth2 {
    const EXPECTED: &'static str =
        "{\"token_url\", \"client_id\", \"client_secret\", \"scopes\": [...]}";
}

fn optional_basic_auth<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BasicAuth>, D::Error> {
    de::hidden::<_, BasicAuth>(d).map(Some)
}

fn optional_oauth2<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OAuth2>, D::Error> {
    de::hidden::<_, OAuth2>(d).map(Some)
}

/// A duration that may be zero (`overlap`, `settle`).
fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = de::Text::deserialize_from(d)?;
    let parsed: Result<Duration, serde::de::value::Error> = humantime_serde::deserialize(
        serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text.trim()),
    );
    parsed.map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "expected a duration such as \"30s\", \"5m\" or \"0s\", got {text:?}"
        ))
    })
}

fn optional_time<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<time::OffsetDateTime>, D::Error> {
    let text = de::Text::deserialize_from(d)?;
    time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map(Some)
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "expected an RFC 3339 time such as \"2026-12-01T00:00:00Z\", got {text:?}"
            ))
        })
}

/// A query parameter's name: what an API documents, never anything that needs escaping.
fn query_param(setting: &str, name: &str) -> Result<String, Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.[]".contains(&b));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(refuse(
            setting,
            format!(
                "expected a query parameter name of at most 64 letters, digits, '-', '_', '.', '[' or ']', got {name:?}"
            ),
        ))
    }
}

impl ApiParams {
    fn default_interval() -> Duration {
        Duration::from_secs(10)
    }

    fn default_page_size() -> usize {
        1000
    }

    fn default_page_size_param() -> String {
        "limit".into()
    }

    fn default_timeout() -> Duration {
        Duration::from_secs(30)
    }

    fn default_max_page_bytes() -> usize {
        32 * 1024 * 1024
    }

    pub(crate) fn check(&mut self) -> Result<(), Refusal> {
        self.auth = match (
            self.bearer_token.take(),
            self.basic_auth.take(),
            self.oauth2.take(),
        ) {
            (None, None, None) => None,
            (Some(t), None, None) => Some(ApiAuth::Bearer(t)),
            (None, Some(b), None) => Some(ApiAuth::Basic {
                username: b.username,
                password: b.password,
            }),
            (None, None, Some(o)) => {
                if o.client_id.is_empty() {
                    return Err(refuse("params.oauth2.client_id", "must not be empty"));
                }
                if o.client_secret.expose_secret().is_empty() {
                    return Err(refuse("params.oauth2.client_secret", "must not be empty"));
                }
                for s in &o.scopes {
                    // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
                    if s.is_empty()
                        || !s.bytes().all(|b| {
                            b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b)
                        })
                    {
                        return Err(refuse(
                            "params.oauth2.scopes",
                            format!("{s:?} is not a scope (RFC 6749 §3.3)"),
                        ));
                    }
                }
                Some(ApiAuth::OAuth2(o))
            }
            _ => {
                return Err(refuse(
                    "params.bearer_token",
                    "set one of bearer_token, basic_auth and oauth2, not several",
                ));
            }
        };
        if self.auth.is_some()
            && self
                .headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("authorization"))
        {
            return Err(refuse(
                "params.headers.Authorization",
                "set either an Authorization header or bearer_token/basic_auth/oauth2, not both",
            ));
        }
        check_headers(&self.headers)?;
        check_range("params.page_size", self.page_size, 1..=100_000)?;
        if !self.page_size_param.is_empty() {
            self.page_size_param = query_param("params.page_size_param", &self.page_size_param)?;
        }
        if !self.items.is_empty() && !self.items.starts_with('/') {
            return Err(refuse(
                "params.items",
                format!(
                    "expected a JSON pointer such as \"/events\", or \"\" for a body that is the array, got {:?}",
                    self.items
                ),
            ));
        }
        check_range(
            "params.max_page_bytes",
            self.max_page_bytes,
            1024..=1024 * 1024 * 1024,
        )?;
        check_tenants("params.tenants", &self.tenants)?;
        self.cursor = self.style()?;
        Ok(())
    }

    /// The cursor style from `cursor` and the preset's parameters; a parameter of another
    /// preset is refused rather than ignored.
    fn style(&self) -> Result<CursorStyle, Refusal> {
        let token = match (&self.token_pointer, &self.token_param) {
            (Some(p), Some(q)) => Some((p.0.clone(), query_param("params.token_param", q)?)),
            (Some(p), None) => Some((p.0.clone(), "page_token".to_owned())),
            (None, Some(_)) => {
                return Err(refuse(
                    "params.token_param",
                    "goes with token_pointer (where the next token is in the body)",
                ));
            }
            (None, None) => None,
        };
        let window_set = [
            ("since_param", self.since_param.is_some()),
            ("until_param", self.until_param.is_some()),
            ("time_format", self.time_format.is_some()),
            ("overlap", self.overlap.is_some()),
            ("settle", self.settle.is_some()),
            ("start", self.start.is_some()),
        ];
        let not_here = |preset: &str, set: &[(&str, bool)]| -> Result<(), Refusal> {
            match set.iter().find(|(_, on)| *on) {
                Some((name, _)) => Err(refuse(
                    format!("params.{name}"),
                    format!("is a parameter of another cursor style than {preset:?}"),
                )),
                None => Ok(()),
            }
        };
        match self.style_name {
            StyleName::Link => {
                not_here("link", &window_set)?;
                not_here(
                    "link",
                    &[
                        ("token_pointer", self.token_pointer.is_some()),
                        ("token_param", self.token_param.is_some()),
                    ],
                )?;
                Ok(CursorStyle::Link)
            }
            StyleName::Token => {
                not_here("token", &window_set)?;
                let (pointer, param) =
                    token.unwrap_or_else(|| ("/next_page_token".into(), "page_token".into()));
                Ok(CursorStyle::Token { pointer, param })
            }
            StyleName::Window => {
                let since_param = query_param(
                    "params.since_param",
                    self.since_param.as_deref().unwrap_or("since"),
                )?;
                let until_param = query_param(
                    "params.until_param",
                    self.until_param.as_deref().unwrap_or("until"),
                )?;
                if since_param == until_param {
                    return Err(refuse("params.until_param", "must differ from since_param"));
                }
                let overlap = self.overlap.unwrap_or(Duration::from_secs(300));
                let settle = self.settle.unwrap_or(Duration::from_secs(30));
                for (name, d) in [("overlap", overlap), ("settle", settle)] {
                    if d > Duration::from_secs(7 * 24 * 3600) {
                        return Err(refuse(format!("params.{name}"), "expected at most 7 days"));
                    }
                }
                Ok(CursorStyle::Window(Window {
                    since_param,
                    until_param,
                    time_format: self.time_format.unwrap_or_default(),
                    overlap,
                    settle,
                    start: self.start,
                    token,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::Config;
    use crate::sources::SourceKind;

    const KEY: &str = "test-id-key-0123456789abcdef0123456789";

    fn definition(params: &Value) -> Value {
        let mut p = json!({
            "url": "https://acme.okta.com/api/v1/logs",
            "cursor": "link",
            "mapping": {"id": "/uuid", "tenant": {"const": "acme"}, "type": "/eventType",
                "actions": {"user.session.start": "session.create"}, "actor": {"id": "/actor/id"}}
        });
        for (k, v) in params.as_object().expect("an object") {
            if v.is_null() {
                p.as_object_mut().unwrap().remove(k);
            } else {
                p[k] = v.clone();
            }
        }
        json!({"name": "okta", "type": "api", "params": p})
    }

    fn load(params: &Value) -> Result<ApiParams, String> {
        let vars = [
            (
                "AUDITBRIDGE_SOURCES".to_owned(),
                json!([definition(params)]).to_string(),
            ),
            ("AUDITBRIDGE_ID_KEY".to_owned(), KEY.to_owned()),
        ];
        let config = Config::from_env(vars).map_err(|e| e.to_string())?;
        match config.sources.into_iter().next().map(|s| s.kind) {
            Some(SourceKind::Api(p)) => Ok(*p),
            other => panic!("not an api source: {other:?}"),
        }
    }

    #[test]
    fn defaults_of_each_preset() {
        let p = load(&json!({})).unwrap();
        assert_eq!(p.cursor, CursorStyle::Link);
        assert_eq!(p.interval, Duration::from_secs(10));
        assert_eq!((p.page_size, p.page_size_param.as_str()), (1000, "limit"));
        assert_eq!(p.items, "");
        assert_eq!(p.rate_limit_reset, ResetStyle::Epoch);
        let p = load(&json!({"cursor": "token"})).unwrap();
        assert_eq!(
            p.cursor,
            CursorStyle::Token {
                pointer: "/next_page_token".into(),
                param: "page_token".into()
            }
        );
        let p =
            load(&json!({"cursor": "window", "time_format": "unix_ms", "overlap": "0s"})).unwrap();
        let CursorStyle::Window(w) = p.cursor else {
            panic!("a window")
        };
        assert_eq!(
            (w.since_param.as_str(), w.until_param.as_str()),
            ("since", "until")
        );
        assert_eq!(w.time_format, TimeFormat::UnixMs);
        assert_eq!(
            (w.overlap, w.settle),
            (Duration::ZERO, Duration::from_secs(30))
        );
        assert_eq!(w.token, None);
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        for params in [
            json!({"headers": {"Authorization": "SSWS 00very-secret-okta-token"}}),
            json!({"bearer_token": "00very-secret-okta-token"}),
            json!({"basic_auth": {"username": "u", "password": "00very-secret-okta-token"}}),
            json!({"oauth2": {"token_url": "https://acme.okta.com/token", "client_id": "c",
                "client_secret": "00very-secret-okta-token", "scopes": ["okta.logs.read"]}}),
        ] {
            let p = load(&params).unwrap();
            assert!(!format!("{p:?}").contains("00very-secret"), "{p:?}");
        }
    }

    /// Each refusal names the setting it is about.
    #[test]
    fn what_is_refused_is_named() {
        for (params, named) in [
            (json!({"url": "ftp://acme.okta.com/logs"}), "params.url"),
            (json!({"cursor": "offset"}), "cursor"),
            (json!({"since_param": "from"}), "params.since_param"),
            (
                json!({"cursor": "token", "overlap": "5m"}),
                "params.overlap",
            ),
            (json!({"token_param": "p"}), "params.token_param"),
            (
                json!({"cursor": "window", "since_param": "t", "until_param": "t"}),
                "params.until_param",
            ),
            (
                json!({"cursor": "window", "settle": "30d"}),
                "params.settle",
            ),
            (json!({"cursor": "window", "start": "yesterday"}), "start"),
            (json!({"page_size": 0}), "params.page_size"),
            (
                json!({"page_size_param": "limit&x=1"}),
                "params.page_size_param",
            ),
            (json!({"items": "events"}), "params.items"),
            (json!({"max_page_bytes": 10}), "params.max_page_bytes"),
            (json!({"interval": "0s"}), "interval"),
            (
                json!({"bearer_token": "t0123", "basic_auth": {"username": "u", "password": "p"}}),
                "params.bearer_token",
            ),
            (
                json!({"bearer_token": "t0123", "headers": {"authorization": "SSWS x"}}),
                "params.headers.Authorization",
            ),
            (
                json!({"oauth2": {"token_url": "https://a/t", "client_id": "", "client_secret": "s", "scopes": []}}),
                "params.oauth2.client_id",
            ),
            (
                json!({"oauth2": {"token_url": "https://a/t", "client_id": "c", "client_secret": "s", "scopes": ["a b"]}}),
                "params.oauth2.scopes",
            ),
            (json!({"tenants": ["acme", ""]}), "params.tenants"),
            (json!({"mapping": null}), "mapping"),
        ] {
            let e = load(&params).unwrap_err();
            assert!(e.contains("okta"), "{params}: {e}");
            assert!(e.contains(named), "{params}: expected {named} in {e}");
        }
    }
}
