//! Bearer tokens: each is scoped to one tenant or marked admin (every tenant), and carries
//! scopes (`read` for the query API, `ingest` for writing events).
//!
//! Configuration holds only the SHA-256 of each token (`auditbridge token new` makes a token
//! and its entry). A presented token is hashed and compared with *every* configured hash in
//! constant time, so neither the comparison nor the position of a match leaks through timing.
//! Tokens themselves are never stored, logged or echoed.

use std::fmt;
use std::sync::Arc;

use auditbridge_config::ApiToken;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

pub use auditbridge_config::Scope;

/// The caller, once its token checked out.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's configured name (safe to log).
    pub name: String,
    /// The one tenant it may see or write; `None` for an admin token (every tenant).
    pub tenant: Option<String>,
    pub scopes: Vec<Scope>,
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl Principal {
    /// 403 unless the token has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "token {:?} does not have the {:?} scope",
                self.name,
                scope.as_str()
            )))
        }
    }

    /// 403 unless the token may act on `tenant`. Never an empty result instead: a refusal
    /// must be visible as one.
    pub fn authorize_tenant(&self, tenant: &str) -> Result<(), ApiError> {
        match &self.tenant {
            None => Ok(()),
            Some(own) if own == tenant => Ok(()),
            Some(_) => Err(ApiError::Forbidden(format!(
                "token {:?} may not access tenant {tenant:?}",
                self.name
            ))),
        }
    }

    /// The tenant a request is about: the `tenant` parameter if given (and allowed), else the
    /// token's own tenant. An admin token must name one.
    pub fn tenant_for(&self, requested: Option<&str>) -> Result<String, ApiError> {
        match (requested, &self.tenant) {
            (Some(t), _) => {
                auditbridge_event::validate_tenant(t)
                    .map_err(|e| ApiError::bad("tenant", e.detail))?;
                self.authorize_tenant(t)?;
                Ok(t.to_owned())
            }
            (None, Some(own)) => Ok(own.clone()),
            (None, None) => Err(ApiError::bad(
                "tenant",
                "required with an admin token (which may read every tenant)",
            )),
        }
    }
}

struct Known {
    hash: [u8; 32],
    principal: Principal,
}

/// The configured tokens.
#[derive(Default)]
pub struct Tokens {
    known: Vec<Known>,
}

impl fmt::Debug for Tokens {
    // Names only: even hashes stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.known.iter().map(|k| &k.principal.name))
            .finish()
    }
}

impl Tokens {
    /// The tokens of the configuration (`[[api_tokens]]`, `AUDITBRIDGE_API_TOKENS`), which
    /// checked them at load.
    pub fn new(tokens: &[ApiToken]) -> Tokens {
        Tokens {
            known: tokens
                .iter()
                .map(|t| Known {
                    hash: t.sha256,
                    principal: Principal {
                        name: t.name.clone(),
                        tenant: t.tenant.clone(),
                        scopes: t.scopes.clone(),
                    },
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The principal for a presented token, comparing against every hash in constant time.
    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        let presented = digest_token(token);
        let mut found = None;
        for k in &self.known {
            if bool::from(k.hash.ct_eq(&presented)) {
                found = Some(&k.principal);
            }
        }
        found
    }
}

/// The SHA-256 of a token, as configuration holds it (in hex).
pub fn hash_token(token: &str) -> String {
    hex::encode(digest_token(token))
}

/// The SHA-256 of a token, as [`ApiToken::sha256`] holds it.
pub fn digest_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token (`abt_` and 43 base62 characters, 256 bits).
pub fn generate_token() -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let body: String = (0..43)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("abt_{body}")
}

impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Arc<Tokens>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let tokens = Arc::<Tokens>::from_ref(state);
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or(ApiError::Unauthorized(
                "missing bearer token (Authorization: Bearer <token>)",
            ))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized(
                "the Authorization header must be \"Bearer <token>\"",
            ))?;
        tokens
            .authenticate(token)
            .cloned()
            .ok_or(ApiError::Unauthorized("unknown token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tokens_authenticate_by_hash_only() {
        let t = generate_token();
        assert!(t.starts_with("abt_") && t.len() == 47, "{t}");
        let items = json!([
            {"name": "acme", "sha256": hash_token(&t), "tenant": "acme"},
            {"name": "ops", "sha256": hash_token("other"), "admin": true, "scopes": ["read", "ingest"]},
        ]);
        let vars = [("AUDITBRIDGE_API_TOKENS".to_owned(), items.to_string())];
        let tokens = Tokens::new(
            &auditbridge_config::Config::from_env(vars)
                .unwrap()
                .api_tokens,
        );
        let p = tokens.authenticate(&t).unwrap();
        assert_eq!(p.name, "acme");
        assert_eq!(p.tenant.as_deref(), Some("acme"));
        assert_eq!(p.scopes, [Scope::Read]);
        assert!(p.require(Scope::Ingest).is_err());
        assert!(p.authorize_tenant("globex").is_err());
        assert_eq!(p.tenant_for(None).unwrap(), "acme");
        assert!(matches!(
            p.tenant_for(Some("globex")),
            Err(ApiError::Forbidden(_))
        ));
        let admin = tokens.authenticate("other").unwrap();
        assert!(admin.tenant.is_none());
        assert!(admin.tenant_for(None).is_err());
        assert_eq!(admin.tenant_for(Some("globex")).unwrap(), "globex");
        assert!(tokens.authenticate("abt_wrong").is_none());
        assert!(!format!("{tokens:?}").contains(&hash_token(&t)));
    }
}
