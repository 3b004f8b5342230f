//! API token definitions (`[[api_tokens]]`, `AUDITBRIDGE_API_TOKENS`) for `auditbridge
//! serve`: a name, the SHA-256 of the token (never the token), one tenant or `admin = true`,
//! and scopes. Read into [`ApiToken`]s and checked here, at load.

use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::lists::{Refusal, check_tenants, refuse, typed};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Query, tail and chart the trail.
    Read,
    /// Write events (`POST /v1/ingest`).
    Ingest,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Ingest => "ingest",
        }
    }
}

/// One configured token.
#[derive(Clone)]
pub struct ApiToken {
    /// Safe to log.
    pub name: String,
    /// The SHA-256 of the token.
    pub sha256: [u8; 32],
    /// The one tenant it may see or write; `None` for an admin token (every tenant).
    pub tenant: Option<String>,
    pub scopes: Vec<Scope>,
}

// Names, tenants and scopes only: even hashes stay out of logs.
impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Definition {
    name: String,
    #[serde(deserialize_with = "sha256")]
    sha256: [u8; 32],
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    scopes: Option<Vec<Scope>>,
}

fn sha256<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
    let text = String::deserialize(d).map_err(|_: D::Error| {
        serde::de::Error::custom("expected 64 hex digits, the SHA-256 of the token")
    })?;
    hex::decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| {
            serde::de::Error::custom(
                "expected 64 hex digits, the SHA-256 of the token (see `auditbridge token new`)",
            )
        })
}

/// Reads and checks one definition.
pub(crate) fn read(value: &Value) -> Result<ApiToken, Refusal> {
    let d: Definition = typed(value)?;
    if d.name.trim().is_empty() {
        return Err(refuse("name", "must not be empty"));
    }
    let tenant = match (d.tenant, d.admin) {
        (Some(_), true) => {
            return Err(refuse(
                "tenant",
                "set either tenant or admin = true, not both",
            ));
        }
        (None, false) => return Err(refuse("tenant", "required unless admin = true")),
        (Some(t), false) => {
            check_tenants("tenant", std::slice::from_ref(&t))?;
            Some(t)
        }
        (None, true) => None,
    };
    let scopes = d.scopes.unwrap_or_else(|| vec![Scope::Read]);
    if scopes.is_empty() {
        return Err(refuse("scopes", "must name at least one of read, ingest"));
    }
    Ok(ApiToken {
        name: d.name,
        sha256: d.sha256,
        tenant,
        scopes,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    fn load(items: &serde_json::Value) -> Result<crate::Config, crate::ConfigError> {
        crate::Config::from_env([("AUDITBRIDGE_API_TOKENS".to_owned(), items.to_string())])
    }

    #[test]
    fn bad_entries_name_the_entry_and_field() {
        let h = "ab".repeat(32);
        for (item, needle) in [
            (
                json!({"name": "a", "sha256": "zz", "tenant": "acme"}),
                "sha256",
            ),
            (json!({"name": "a", "sha256": h}), "tenant: required"),
            (
                json!({"name": "a", "sha256": h, "tenant": "acme", "admin": true}),
                "not both",
            ),
            (
                json!({"name": "a", "sha256": h, "tenant": "Acme!"}),
                "tenant",
            ),
            (
                json!({"name": "a", "sha256": h, "tenant": "acme", "scopes": ["write"]}),
                "write",
            ),
            (
                json!({"name": "a", "sha256": h, "tenant": "acme", "scope": ["read"]}),
                "scope",
            ),
            (
                json!({"name": "a", "sha256": h, "tenant": "acme", "scopes": []}),
                "scopes",
            ),
        ] {
            let err = load(&json!([item])).unwrap_err().to_string();
            assert!(
                err.contains("api token a: ")
                    && err.contains(needle)
                    && err.contains("from AUDITBRIDGE_API_TOKENS"),
                "{err}"
            );
        }
        let err = load(&json!([
            {"name": "a", "sha256": h, "tenant": "acme"},
            {"name": "b", "sha256": h, "tenant": "acme"},
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("api token b: sha256") && err.contains("twice"),
            "{err}"
        );
        let c = load(&json!([{"name": "a", "sha256": h, "admin": true}])).unwrap();
        assert!(!format!("{c:?}").contains(&h), "{c:?}");
    }
}
