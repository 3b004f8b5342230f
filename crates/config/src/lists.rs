//! What the three lists of definitions share (`[[destinations]]`, `[[sources]]`,
//! `[[api_tokens]]`, each extended by its `AUDITBRIDGE_*` JSON array): reading one item into
//! its serde type with the path of a bad setting, names that are unique, and errors that name
//! the item, the setting and where the item came from.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::ConfigError;

/// Where a definition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An array of tables in the configuration file.
    File(PathBuf),
    /// The JSON array in this environment variable.
    Env(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Env(var) => write!(f, "from {var}"),
        }
    }
}

/// One item of a list, as it was written, and where.
pub(crate) struct Item {
    pub(crate) value: Value,
    pub(crate) origin: Origin,
}

/// A setting of one definition that cannot be used: (setting, message).
pub(crate) type Refusal = (String, String);

/// The next number of an item written at `origin` (from 1 per origin): how an item without a
/// usable name is called, in every list.
pub(crate) fn number_in(position: &mut Vec<(Origin, usize)>, origin: &Origin) -> usize {
    match position.iter_mut().find(|(o, _)| o == origin) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            position.push((origin.clone(), 1));
            1
        }
    }
}

pub(crate) fn refuse(setting: impl Into<String>, message: impl Into<String>) -> Refusal {
    (setting.into(), message.into())
}

/// Reads `value` as `T`; a refusal names the path of the setting serde stopped at.
pub(crate) fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, Refusal> {
    typed_text(&value.to_string())
}

fn typed_text<T: DeserializeOwned>(json: &str) -> Result<T, Refusal> {
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "definition".to_owned()
        } else {
            path
        };
        // serde_json's position is in the text written for reading, not the operator's.
        let mut message = e.into_inner().to_string();
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        (path, message)
    })
}

/// Reads a `{"name", "type", "params"}` definition as `T`, in the shape `{"name", "common":
/// {..}, "kind": {"type", "params": {..}}}`: the keys of `params` named in `common` move to a
/// sibling object `common`, and `type` with the rest of `params` to `kind`, which serde reads
/// with an adjacently tagged enum for the type's own parameters while both parts refuse
/// unknown keys (serde's `flatten` cannot be combined with `deny_unknown_fields`). The new
/// shape is written as text with `type` before `params` (a `serde_json::Value` would sort
/// them): read in that order, serde takes the type first and reads the parameters in place,
/// so that a refusal names its path. The path is then given back as the operator wrote it.
pub(crate) fn typed_definition<T: DeserializeOwned>(
    value: &Value,
    common: &[&str],
) -> Result<T, Refusal> {
    let Value::Object(item) = value else {
        return typed(value);
    };
    // The keys the operator may write; `common` and `kind` exist only in the new shape.
    if let Some(key) = item
        .keys()
        .find(|k| !["name", "type", "params"].contains(&k.as_str()))
    {
        return Err(refuse(
            "definition",
            format!("unknown field `{key}`, expected `name`, `type` or `params`"),
        ));
    }
    let mut item = item.clone();
    let mut params = match item.remove("params") {
        Some(Value::Object(params)) => params,
        Some(other) => {
            // Not an object: left where it was, for serde to refuse by its written name.
            item.insert("params".into(), other);
            Map::new()
        }
        None => Map::new(),
    };
    let shared: Map<String, Value> = common
        .iter()
        .filter_map(|key| params.remove(*key).map(|v| ((*key).to_owned(), v)))
        .collect();
    let kind = item
        .remove("type")
        .map_or_else(String::new, |t| format!("\"type\":{t},"));
    let mut text = String::from("{");
    for (key, value) in &item {
        text.push_str(&format!("{}:{value},", Value::from(key.as_str())));
    }
    if !common.is_empty() {
        text.push_str(&format!("\"common\":{},", Value::Object(shared)));
    }
    text.push_str(&format!(
        "\"kind\":{{{kind}\"params\":{}}}}}",
        Value::Object(params)
    ));
    typed_text(&text).map_err(|(path, message)| {
        // The type's own parameters refuse the common ones' names too: say them.
        let message = if path.starts_with("kind.params") && message.starts_with("unknown field") {
            format!(
                "{message} (or one of the common parameters: {})",
                common.join(", ")
            )
        } else {
            message
        };
        (written_path(&path), message)
    })
}

/// The setting as written, for a path in the shape [`typed_definition`] reads.
fn written_path(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("common.") {
        return format!("params.{rest}");
    }
    if let Some(rest) = path.strip_prefix("kind.params") {
        return format!("params{rest}");
    }
    if path == "kind" || path.starts_with("kind.type") {
        return "type".into();
    }
    path.to_owned()
}

/// A property no two items of a list may share: the setting that holds it, how to get it,
/// and the message when two do.
pub(crate) type Unique<T> = (&'static str, fn(&T) -> Vec<u8>, &'static str);

/// Reads every item of one list with `read`, and refuses an item that shares a [`Unique`]
/// property with an earlier one. `what` names an item in errors ("destination").
pub(crate) fn read_list<T>(
    what: &'static str,
    items: Vec<Item>,
    mut read: impl FnMut(&Value) -> Result<T, Refusal>,
    unique: &[Unique<T>],
) -> Result<Vec<T>, ConfigError> {
    let mut seen: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); unique.len()];
    let mut out = Vec::with_capacity(items.len());
    // An item without a usable name is called by its position where it was written.
    let mut position: Vec<(Origin, usize)> = Vec::new();
    for item in items {
        let n = number_in(&mut position, &item.origin);
        let label = item
            .value
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{n}"), str::to_owned);
        let fail = |(setting, message): Refusal| ConfigError::Definition {
            what,
            name: label.clone(),
            setting,
            message,
            origin: item.origin.clone(),
        };
        let definition = read(&item.value).map_err(fail)?;
        for ((setting, key, message), seen) in unique.iter().zip(&mut seen) {
            if !seen.insert(key(&definition)) {
                return Err(fail(refuse(*setting, *message)));
            }
        }
        out.push(definition);
    }
    Ok(out)
}

/// Names follow the tenant grammar, `[a-z0-9][a-z0-9_-]{0,62}`: they appear in metric labels
/// (and, for sources, in URLs and file names).
pub(crate) fn check_name(name: &str) -> Result<(), Refusal> {
    auditbridge_event::validate_tenant(name).map_err(|_| {
        refuse(
            "name",
            format!("expected [a-z0-9][a-z0-9_-]{{0,62}}, got {name:?}"),
        )
    })
}

/// Tenants a definition names (a filter, the tenants a source may write).
pub(crate) fn check_tenants(setting: &str, tenants: &[String]) -> Result<(), Refusal> {
    for t in tenants {
        auditbridge_event::validate_tenant(t).map_err(|e| refuse(setting, e.detail))?;
    }
    Ok(())
}

/// A number parameter within `range`.
pub(crate) fn check_range(
    setting: &str,
    v: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, Refusal> {
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(refuse(
            setting,
            format!("expected {} to {}, got {v}", range.start(), range.end()),
        ))
    }
}
