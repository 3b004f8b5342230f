//! The two layers over the defaults, as `figment` providers of ours: the TOML file (its keys
//! checked against the schema, so a typo names the file and the key) and the `AUDITBRIDGE_*`
//! variables (every value as text, as the environment holds it — figment's own `Env` guesses
//! types, which turns `007` into 7 and a numeric-looking string into a number — and the list
//! variables as JSON arrays, except that `AUDITBRIDGE_RETENTION` may also be a plain value).
//! Each layer names its keys the way the operator wrote them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use figment::providers::{Format as _, Toml};
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::Deserialize;

use crate::{ConfigError, LISTS, Origin, Settings};

/// The environment variable of a file key.
pub(crate) fn env_name(key: &str) -> String {
    format!("AUDITBRIDGE_{}", key.to_ascii_uppercase())
}

/// Every key of the schema ([`Settings`]), as serde's derive lists them.
pub(crate) fn file_keys() -> &'static [&'static str] {
    static KEYS: OnceLock<&'static [&'static str]> = OnceLock::new();
    KEYS.get_or_init(struct_fields::<Settings>)
}

/// Whether `var` is the variable of a setting.
pub(crate) fn is_setting(var: &str) -> bool {
    file_keys().iter().any(|k| env_name(k) == var)
}

/// How an error names `key`: its variable, `key (in <file>)`, or `key (default)`.
pub(crate) fn setting_name(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key).map(|md| &md.source) {
        Some(Some(Source::File(path))) => format!("{key} (in {})", path.display()),
        Some(_) => env_name(key),
        None => format!("{key} (default)"),
    }
}

/// Where a list item with `tag` came from: the file, or the list variable `var`.
pub(crate) fn origin(figment: &Figment, tag: Tag, var: &'static str) -> Origin {
    match figment.get_metadata(tag).and_then(|md| md.source.as_ref()) {
        Some(Source::File(path)) => Origin::File(path.clone()),
        _ => Origin::Env(var),
    }
}

/// The configuration file: read and checked when it is made, so that its errors are ours.
pub(crate) struct File {
    path: PathBuf,
    data: Dict,
}

impl File {
    pub(crate) fn read(path: PathBuf) -> Result<File, ConfigError> {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        // The parser's own message quotes the offending line, which may hold a secret: the
        // error says where it is instead.
        if let Err(e) = text.parse::<toml::Table>() {
            let at = e.span().map_or(0, |span| span.start);
            let line = text[..at.min(text.len())].matches('\n').count() + 1;
            return Err(ConfigError::Parse {
                path,
                message: format!("line {line}: {}", e.message()),
            });
        }
        let data: Dict = Toml::from_str(&text).map_err(|_| ConfigError::Parse {
            path: path.clone(),
            message: "cannot be read as TOML".into(),
        })?;
        for (key, value) in &data {
            if !file_keys().contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    path,
                    key: key.clone(),
                });
            }
            if LISTS.iter().any(|(list, _)| list == key) && !matches!(value, Value::Array(..)) {
                return Err(ConfigError::Parse {
                    path,
                    message: format!("`{key}` must be an array of tables ([[{key}]])"),
                });
            }
        }
        Ok(File { path, data })
    }
}

impl Provider for File {
    fn metadata(&self) -> Metadata {
        Metadata::named("TOML file")
            .source(Source::File(self.path.clone()))
            .interpolater(|_: &Profile, keys: &[&str]| keys.join("."))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

/// The `AUDITBRIDGE_*` variables of the schema's keys.
pub(crate) struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    pub(crate) fn new(vars: &BTreeMap<String, String>) -> Env {
        Env { vars: vars.clone() }
    }
}

impl Provider for Env {
    fn metadata(&self) -> Metadata {
        Metadata::named("the environment")
            .interpolater(|_: &Profile, keys: &[&str]| env_name(&keys.join("_")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for key in file_keys() {
            let var = env_name(key);
            let Some(text) = self.vars.get(&var) else {
                continue;
            };
            if !LISTS.iter().any(|(list, _)| list == key) {
                dict.insert((*key).to_owned(), Value::from(text.clone()));
                continue;
            }
            if text.trim().is_empty() {
                continue;
            }
            let expected = if *key == "retention" {
                let plain = text.trim();
                if !plain.starts_with(['[', '{']) {
                    // A plain duration or `forever`: the default, as the one item without a
                    // tenant. Then, as the file's items, it replaces the file's default only.
                    let mut item = Dict::new();
                    item.insert("keep".into(), Value::from(plain.to_owned()));
                    dict.insert((*key).to_owned(), Value::from(vec![Value::from(item)]));
                    continue;
                }
                "a duration, \"forever\", or a JSON array of {\"tenant\", \"keep\"} objects"
            } else {
                "a JSON array of {\"name\", ...} objects"
            };
            // The value is not quoted in these errors: a definition may hold a secret.
            let parsed: Value = serde_json::from_str(text)
                .map_err(|e| figment::Error::from(format!("{var}: expected {expected} ({e})")))?;
            if !matches!(parsed, Value::Array(..)) {
                return Err(figment::Error::from(format!(
                    "{var}: expected {expected}, got another JSON value"
                )));
            }
            dict.insert((*key).to_owned(), parsed);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// The field names serde's derive gives a struct: asked for by a deserializer that only
/// records them.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};

    struct Fields<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Done;

    impl std::fmt::Display for Done {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("fields recorded")
        }
    }

    impl std::error::Error for Done {}

    impl de::Error for Done {
        fn custom<M: std::fmt::Display>(_: M) -> Done {
            Done
        }
    }

    impl<'de> de::Deserializer<'de> for Fields<'_> {
        type Error = Done;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Done> {
            Err(Done)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Done> {
            *self.0 = fields;
            Err(Done)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}
