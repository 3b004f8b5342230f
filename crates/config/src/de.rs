//! Deserializers for settings that arrive as text from the environment or as typed values from
//! the file: bounded integers (a number, or a string holding one), bounded durations (through
//! `humantime-serde`, the one duration parser; some counted in whole seconds), and secrets
//! with a minimum length. The bounds are part of the error message, so an operator sees the
//! accepted range at once.

use std::fmt;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};

/// An integer setting from `LO` to `HI`: a TOML integer, or the text of one (every
/// environment variable is text).
pub(crate) fn int<'de, D, T, const LO: u64, const HI: u64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Bounded<const LO: u64, const HI: u64>;
    impl<const LO: u64, const HI: u64> Bounded<LO, HI> {
        fn check<E: de::Error>(v: u64, shown: Unexpected<'_>) -> Result<u64, E> {
            if (LO..=HI).contains(&v) {
                Ok(v)
            } else {
                Err(E::invalid_value(shown, &Self))
            }
        }
    }
    impl<const LO: u64, const HI: u64> fmt::Display for Bounded<LO, HI> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an integer from {LO} to {HI}")
        }
    }
    impl<'de, const LO: u64, const HI: u64> Visitor<'de> for Bounded<LO, HI> {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(self, f)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Self::check(v, Unexpected::Unsigned(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            let shown = Unexpected::Signed(v);
            u64::try_from(v)
                .map_err(|_| E::invalid_value(shown, &self))
                .and_then(|v| Self::check(v, shown))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            let shown = Unexpected::Str(v);
            v.trim()
                .parse::<u64>()
                .map_err(|_| E::invalid_value(shown, &self))
                .and_then(|n| Self::check(n, shown))
        }
    }
    let v = d.deserialize_any(Bounded::<LO, HI>)?;
    T::try_from(v).map_err(|_| de::Error::custom(format!("{v} does not fit")))
}

/// A duration setting from `LO_MS` to `HI_MS` milliseconds, written as `humantime` text
/// (`"500ms"`, `"30s"`, `"7d"`).
pub(crate) fn duration<'de, D, const LO_MS: u64, const HI_MS: u64>(
    d: D,
) -> Result<Duration, D::Error>
where
    D: Deserializer<'de>,
{
    let (lo, hi) = (Duration::from_millis(LO_MS), Duration::from_millis(HI_MS));
    let expected = || {
        format!(
            "a duration such as \"500ms\", \"30s\" or \"7d\", from {} to {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        )
    };
    let text = Text::deserialize(d)?.0;
    let v: Duration = humantime_serde::deserialize(
        de::value::StrDeserializer::<de::value::Error>::new(text.trim()),
    )
    .map_err(|_| de::Error::invalid_value(Unexpected::Str(&text), &expected().as_str()))?;
    if v < lo || v > hi {
        return Err(de::Error::invalid_value(
            Unexpected::Str(&text),
            &expected().as_str(),
        ));
    }
    Ok(v)
}

/// A duration setting in whole seconds, from `LO_S` to `HI_S` seconds, written as `humantime`
/// text (`"30s"`, `"12h"`, `"1d"`). `"1500ms"` is refused rather than rounded: a setting counted
/// in seconds would otherwise differ, without a word, from what the operator wrote.
pub(crate) fn seconds<'de, D, const LO_S: u64, const HI_S: u64>(d: D) -> Result<Duration, D::Error>
where
    D: Deserializer<'de>,
{
    let text = Text::deserialize_from(d)?;
    whole_seconds(&text, LO_S, HI_S).ok_or_else(|| {
        de::Error::invalid_value(
            Unexpected::Str(&text),
            &seconds_expected(LO_S, HI_S).as_str(),
        )
    })
}

/// `text` as a duration of whole seconds from `lo` to `hi` seconds, or `None`.
pub(crate) fn whole_seconds(text: &str, lo: u64, hi: u64) -> Option<Duration> {
    let v: Duration = humantime_serde::deserialize(
        de::value::StrDeserializer::<de::value::Error>::new(text.trim()),
    )
    .ok()?;
    (v.subsec_nanos() == 0 && (lo..=hi).contains(&v.as_secs())).then_some(v)
}

/// What [`seconds`] says it expected.
pub(crate) fn seconds_expected(lo: u64, hi: u64) -> String {
    format!(
        "a duration in whole seconds such as \"30s\", \"12h\" or \"90d\", from {} to {}",
        short_duration(lo),
        short_duration(hi)
    )
}

/// A bound the way an operator writes it: `366d` or `100y`, not humantime's
/// `1year 18h` (it counts a year as 365.25 days and a month as 30.44).
fn short_duration(secs: u64) -> String {
    const DAY: u64 = 86_400;
    const YEAR: u64 = 31_557_600;
    if secs >= YEAR && secs.is_multiple_of(YEAR) {
        format!("{}y", secs / YEAR)
    } else if secs >= DAY && secs.is_multiple_of(DAY) {
        format!("{}d", secs / DAY)
    } else {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

/// A positive duration without other bounds (the parameters of destinations and sources).
pub(crate) mod positive_duration {
    use std::time::Duration;

    use serde::Deserializer;
    use serde::de::{self, Unexpected};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = super::Text::deserialize_from(d)?;
        let parsed: Result<Duration, de::value::Error> = humantime_serde::deserialize(
            de::value::StrDeserializer::<de::value::Error>::new(text.trim()),
        );
        match parsed {
            Ok(v) if !v.is_zero() => Ok(v),
            _ => Err(de::Error::invalid_value(
                Unexpected::Str(&text),
                &"a positive duration such as \"10s\" or \"5m\"",
            )),
        }
    }

    /// The same, for an optional parameter.
    pub(crate) mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(deserialize_with = "super::deserialize")] Duration);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// Text, from a string (or, from the file, a number or boolean written without quotes).
pub(crate) struct Text(pub(crate) String);

impl Text {
    pub(crate) fn deserialize_from<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Text::deserialize(d).map(|t| t.0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `AUDITBRIDGE_ID_KEY`: empty means unset; a shorter key than [`crate::ID_KEY_MIN_LEN`] is
/// refused with a message that does not repeat it.
pub(crate) fn id_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    let text = Text::deserialize_from(d)?;
    let key = text.trim();
    if key.is_empty() {
        return Ok(None);
    }
    if key.chars().count() < crate::ID_KEY_MIN_LEN {
        return Err(de::Error::custom(format!(
            "expected a secret of at least {} characters, such as the output of \
             `openssl rand -hex 32` (the value is not shown)",
            crate::ID_KEY_MIN_LEN
        )));
    }
    Ok(Some(SecretString::from(key.to_owned())))
}

fn url_setting<'de, D: Deserializer<'de>>(
    d: D,
    schemes: &[&str],
    list: bool,
) -> Result<crate::SecretUrl, D::Error> {
    let text = Text::deserialize_from(d)?;
    crate::SecretUrl::parse(&text, schemes, list).map_err(de::Error::custom)
}

/// One NATS server URL or a comma-separated list of them, each with its scheme; servers of
/// one list carry the same credentials ([`crate::nats_credentials`]).
pub(crate) fn nats_urls<'de, D: Deserializer<'de>>(d: D) -> Result<crate::SecretUrl, D::Error> {
    let url = url_setting(d, &["nats", "tls", "ws", "wss"], true)?;
    crate::nats_credentials(url.expose()).map_err(de::Error::custom)?;
    Ok(url)
}

/// A `tracing` filter (`info`, `auditbridge_worker=debug,info`), checked by the parser
/// logging uses.
pub(crate) fn log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = Text::deserialize_from(d)?;
    tracing_subscriber::EnvFilter::try_new(&text).map_err(|e| {
        de::Error::custom(format!(
            "expected a tracing filter such as \"info\" or \"auditbridge_worker=debug,info\", \
             got {text:?} ({e})"
        ))
    })?;
    Ok(text)
}

/// `text` or `json`, spaces around it ignored.
pub(crate) fn log_format<'de, D: Deserializer<'de>>(d: D) -> Result<crate::LogFormat, D::Error> {
    let text = Text::deserialize_from(d)?;
    match text.trim() {
        "text" => Ok(crate::LogFormat::Text),
        "json" => Ok(crate::LogFormat::Json),
        _ => Err(de::Error::invalid_value(
            Unexpected::Str(&text),
            &"\"text\" or \"json\"",
        )),
    }
}

pub(crate) fn postgres_url<'de, D: Deserializer<'de>>(d: D) -> Result<crate::SecretUrl, D::Error> {
    url_setting(d, &["postgres", "postgresql"], false)
}

/// A PostgreSQL URL, or empty for "none".
pub(crate) fn optional_postgres_url<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<crate::SecretUrl>, D::Error> {
    let text = Text::deserialize_from(d)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    crate::SecretUrl::parse(&text, &["postgres", "postgresql"], false)
        .map(Some)
        .map_err(de::Error::custom)
}

/// NATS names: stream and consumer names may not contain whitespace, `.`, `*`, `>`, path
/// separators or control characters.
pub(crate) fn nats_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = Text::deserialize_from(d)?;
    let ok = !v.is_empty()
        && v.len() <= 255
        && v.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if !ok {
        return Err(de::Error::invalid_value(
            Unexpected::Str(&v),
            &"a name of printable ASCII without spaces, '.', '*', '>', '/' or '\\'",
        ));
    }
    Ok(v)
}

/// A subject prefix: one or more dot-separated tokens, no wildcards.
pub(crate) fn subject_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = Text::deserialize_from(d)?;
    let ok = !v.is_empty()
        && v.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
        });
    if !ok {
        return Err(de::Error::invalid_value(
            Unexpected::Str(&v),
            &"dot-separated subject tokens without spaces or wildcards, such as \"audit\"",
        ));
    }
    Ok(v)
}

pub(crate) fn socket_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::net::SocketAddr, D::Error> {
    let v = Text::deserialize_from(d)?;
    v.trim().parse().map_err(|_| {
        de::Error::invalid_value(
            Unexpected::Str(&v),
            &"a socket address such as 127.0.0.1:9464",
        )
    })
}

/// A secret given as text. Any other value is refused without being shown: serde's own
/// message would repeat it ("invalid type: integer `123456`").
struct SecretText(SecretString);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SecretText, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SecretText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (the value given is not shown: it is a secret)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretText, E> {
                Ok(SecretText(SecretString::from(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<SecretText, E> {
                Ok(SecretText(SecretString::from(v)))
            }
        }
        // Every other type reaches `expecting` through serde's default visitor methods,
        // whose message names the type given but (for these) not the value: numbers, maps
        // and sequences are reported by kind only below.
        d.deserialize_str(V).map_err(|_: D::Error| {
            de::Error::custom("expected a string (the value given is not shown: it is a secret)")
        })
    }
}

/// A secret setting (see [`SecretText`]).
pub(crate) fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    SecretText::deserialize(d).map(|s| s.0)
}

/// An optional secret setting.
pub(crate) fn optional_secret<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SecretString>, D::Error> {
    Ok(Option::<SecretText>::deserialize(d)?.map(|s| s.0))
}

/// A map of secrets (header values).
pub(crate) fn secret_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, SecretString>, D::Error> {
    let map = std::collections::BTreeMap::<String, SecretText>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// A value that may hold a secret (basic-auth credentials, a token hash), read as `T`; when
/// it does not fit, the error says what was expected without repeating the value.
pub(crate) fn hidden<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Hidden,
{
    T::deserialize(d).map_err(|_: D::Error| {
        de::Error::custom(format!(
            "expected {} (the value given is not shown: it may be a secret)",
            T::EXPECTED
        ))
    })
}

/// What [`hidden`] says a value should have been.
pub(crate) trait Hidden {
    const EXPECTED: &'static str;
}

/// A file path, or empty for "none".
pub(crate) fn optional_path<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::path::PathBuf>, D::Error> {
    let text = Text::deserialize_from(d)?;
    Ok((!text.trim().is_empty()).then(|| std::path::PathBuf::from(text.trim())))
}
