//! URLs that may carry credentials: [`SecretUrl`] keeps the text as a
//! [`secrecy::SecretString`] and shows only its redacted form; [`redact_url`] is that redaction
//! (by the `url` crate's parser), and [`nats_credentials`] takes a NATS server list's
//! credentials out so that the client never sees them in a URL it might log.

use std::fmt;

use secrecy::{ExposeSecret as _, SecretString};

/// A validated URL whose user info or query may hold a secret. `Debug` and `Display` show it
/// redacted ([`redact_url`]); [`SecretUrl::expose`] gives the text to the one call that
/// connects with it.
#[derive(Clone)]
pub struct SecretUrl {
    text: SecretString,
    shown: String,
}

impl SecretUrl {
    /// Checks `text` as one URL, or (with `list`) a comma-separated list of them, each with
    /// one of `schemes` and a host. The error shows the URL redacted.
    pub fn parse(text: &str, schemes: &[&str], list: bool) -> Result<SecretUrl, String> {
        let text = text.trim();
        let expected = || {
            format!(
                "{} starting with {}:// and naming a host",
                if list { "URLs" } else { "a URL" },
                schemes.join("://, ")
            )
        };
        let parts = if list {
            split_url_list(text)
        } else {
            vec![text]
        };
        for part in parts {
            let ok = url::Url::parse(part.trim()).is_ok_and(|u| {
                schemes.contains(&u.scheme()) && u.host_str().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return Err(format!(
                    "expected {}, got {:?}",
                    expected(),
                    redact_url(text)
                ));
            }
        }
        Ok(SecretUrl::unchecked(text))
    }

    /// A URL taken as it is: for fixtures and tests, which build their own.
    pub fn unchecked(text: impl Into<String>) -> SecretUrl {
        let text = text.into();
        SecretUrl {
            shown: redact_url(&text),
            text: SecretString::from(text),
        }
    }

    /// The whole URL, credentials included: only for connecting.
    pub fn expose(&self) -> &str {
        self.text.expose_secret()
    }

    /// The URL with its secrets replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.shown
    }
}

/// A URL taken as it is ([`SecretUrl::unchecked`]): for code that builds its own.
impl From<String> for SecretUrl {
    fn from(text: String) -> SecretUrl {
        SecretUrl::unchecked(text)
    }
}

impl From<&str> for SecretUrl {
    fn from(text: &str) -> SecretUrl {
        SecretUrl::unchecked(text)
    }
}

/// Read as it is written (for configuration outside [`crate::Config`], such as a client's
/// store); the reader checks what it needs.
impl<'de> serde::Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SecretUrl, D::Error> {
        crate::de::Text::deserialize_from(d).map(SecretUrl::unchecked)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.shown, f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

// For comparing configurations in tests; not constant-time, and never used to check a secret
// someone presents.
impl PartialEq for SecretUrl {
    fn eq(&self, other: &SecretUrl) -> bool {
        self.expose() == other.expose()
    }
}

/// Replaces the secrets of a URL with `***`, keeping everything else so that it still says
/// where it points: the password of `scheme://user:password@host/...`, a NATS token
/// (`nats://token@host`: user info without a password), and the values of query parameters
/// that carry secrets (`?password=`, `sslpassword`, `token`, `auth_token`, `secret`). A
/// comma-separated list of URLs (NATS servers) is redacted URL by URL; text that is not a URL
/// is shown only when it has no user info that could be a secret.
pub fn redact_url(text: &str) -> String {
    split_url_list(text)
        .into_iter()
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits `nats://a@h1,nats://b@h2` into its URLs: a comma starts a new URL only when what
/// follows it has a scheme, so a comma in a password or in a host list
/// (`postgres://u:p@h1,h2/db`) stays where it is.
fn split_url_list(text: &str) -> Vec<&str> {
    let starts_url = |rest: &str| {
        rest.find("://").is_some_and(|i| {
            i > 0
                && rest[..i]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
    };
    let mut parts = Vec::new();
    let mut from = 0;
    for (i, c) in text.char_indices() {
        if c == ',' && starts_url(text[i + 1..].trim_start()) {
            parts.push(&text[from..i]);
            from = i + 1;
        }
    }
    parts.push(&text[from..]);
    parts
}

/// Query parameters whose values are secrets (compared case-insensitively): passwords,
/// tokens and keys as PostgreSQL, NATS, SIEM collectors, Azure (`code`, `sig`) and API
/// gateways name them.
const SECRET_PARAMS: [&str; 15] = [
    "password",
    "sslpassword",
    "pass",
    "token",
    "auth_token",
    "access_token",
    "private_token",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "key",
    "code",
    "sig",
    "signature",
];

/// Schemes whose user info alone (no password) is a token.
const TOKEN_SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];

fn redact_one_url(text: &str) -> String {
    let lead = &text[..text.len() - text.trim_start().len()];
    let Ok(mut url) = url::Url::parse(text.trim()) else {
        // Nothing in it can be told apart as a secret: shown only when it has no user info
        // or query that could hold one, else up to its scheme.
        return match text.find("://") {
            _ if !text.contains(['@', '?', '#']) => text.to_owned(),
            Some(i) => format!("{}://*** (not a valid URL)", &text[..i]),
            None => "*** (not a valid URL)".to_owned(),
        };
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    } else if !url.username().is_empty() && TOKEN_SCHEMES.contains(&url.scheme()) {
        let _ = url.set_username("***");
    }
    if let Some(query) = url.query() {
        let query = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _))
                    if SECRET_PARAMS
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(key.trim())) =>
                {
                    format!("{key}=***")
                }
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        url.set_query(Some(&query));
    }
    format!("{lead}{url}")
}

/// Credentials for NATS, as a server list's URLs carried them.
#[derive(Clone)]
pub enum NatsAuth {
    /// `nats://user:password@host`.
    UserPassword {
        user: String,
        password: SecretString,
    },
    /// `nats://token@host`.
    Token(SecretString),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}:***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
        }
    }
}

// Whether two servers of a list carry the same credentials; not constant-time, and never used
// to check credentials someone presents.
impl PartialEq for NatsAuth {
    fn eq(&self, other: &NatsAuth) -> bool {
        match (self, other) {
            (
                NatsAuth::UserPassword { user, password },
                NatsAuth::UserPassword {
                    user: other_user,
                    password: other_password,
                },
            ) => user == other_user && password.expose_secret() == other_password.expose_secret(),
            (NatsAuth::Token(a), NatsAuth::Token(b)) => a.expose_secret() == b.expose_secret(),
            _ => false,
        }
    }
}

/// Takes the credentials out of a NATS server list (`nats://u:p@h1,nats://u:p@h2`): the
/// list without user info, and the credentials, percent-decoded. The NATS client is then
/// given the credentials as options and the URLs without them, because it writes the URLs
/// it connects to into its own debug log lines (and ignores credentials in them).
/// Servers of one list must share their credentials: an error says so otherwise (without
/// showing them).
pub fn nats_credentials(list: &str) -> Result<(String, Option<NatsAuth>), String> {
    let mut auth: Option<NatsAuth> = None;
    let mut urls = Vec::new();
    for text in split_url_list(list) {
        let text = text.trim();
        let mut url = match url::Url::parse(text) {
            Ok(url) if !url.username().is_empty() || url.password().is_some() => url,
            _ => {
                urls.push(text.to_owned());
                continue;
            }
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| format!("{}: user info is not UTF-8", redact_url(text)))
        };
        let this = match url.password() {
            Some(password) => NatsAuth::UserPassword {
                user: decode(url.username())?,
                password: SecretString::from(decode(password)?),
            },
            None => NatsAuth::Token(SecretString::from(decode(url.username())?)),
        };
        if auth.as_ref().is_some_and(|a| *a != this) {
            return Err(format!(
                "{}: every server of the list must carry the same credentials",
                redact_url(list)
            ));
        }
        auth = Some(this);
        let _ = url.set_password(None);
        let _ = url.set_username("");
        urls.push(url.to_string());
    }
    Ok((urls.join(","), auth))
}
