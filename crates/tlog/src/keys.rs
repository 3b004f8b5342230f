//! Signed-note keys (C2SP signed-note, golang.org/x/mod/sumdb/note): a private key
//! `PRIVATE+KEY+<name>+<key hash>+<base64(0x01 || 32-byte seed)>` and its verifier key
//! `<name>+<key hash>+<base64(0x01 || 32-byte public key)>`, where the key hash is the key ID
//! of Ed25519 signatures in eight hex digits: the first four bytes of
//! `SHA-256(name || "\n" || 0x01 || public key)`.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

/// The signature type of plain Ed25519 note signatures.
pub(crate) const ED25519: u8 = 0x01;
/// The signature type of timestamped Ed25519 cosignatures (C2SP tlog-cosignature).
pub(crate) const COSIGNATURE: u8 = 0x04;

/// A key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "key name {0:?}: expected a non-empty name without spaces or '+', such as example.com/audit"
    )]
    Name(String),
    #[error("not a signed-note {0} key: expected {1}")]
    Format(&'static str, &'static str),
    #[error("the key hash {given} does not match the key (it is {computed})")]
    Hash { given: String, computed: String },
    #[error("unsupported signature type {0:#04x} (only Ed25519, 0x01)")]
    Algorithm(u8),
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
    {
        return Err(KeyError::Name(name.to_owned()));
    }
    Ok(())
}

/// The key ID of `public` under `name` for signature type `kind`.
pub(crate) fn key_id(name: &str, kind: u8, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([kind]);
    h.update(public.as_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

fn hash_text(id: [u8; 4]) -> String {
    format!("{:08x}", u32::from_be_bytes(id))
}

/// Splits `<name>+<hash>+<base64>` and decodes the key material (`0x01` and 32 bytes).
fn split_key(
    text: &str,
    what: &'static str,
    shape: &'static str,
) -> Result<(String, String, [u8; 32]), KeyError> {
    // Names have no '+'; base64 may.
    let mut parts = text.trim().splitn(3, '+');
    let (Some(name), Some(hash), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(KeyError::Format(what, shape));
    };
    check_name(name)?;
    if hash.len() != 8 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeyError::Format(what, shape));
    }
    let bytes = STANDARD
        .decode(data)
        .map_err(|_| KeyError::Format(what, shape))?;
    let Some((&kind, key)) = bytes.split_first() else {
        return Err(KeyError::Format(what, shape));
    };
    if kind != ED25519 {
        return Err(KeyError::Algorithm(kind));
    }
    let key: [u8; 32] = key.try_into().map_err(|_| KeyError::Format(what, shape))?;
    Ok((name.to_owned(), hash.to_ascii_lowercase(), key))
}

/// The log's signing key. `Debug` shows its name and verifier key only.
#[derive(Clone)]
pub struct SignerKey {
    name: String,
    key: SigningKey,
}

impl fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignerKey")
            .field("verifier", &self.verifier().to_string())
            .finish_non_exhaustive()
    }
}

impl SignerKey {
    /// A new random key named `name`.
    pub fn generate(name: &str) -> Result<SignerKey, KeyError> {
        check_name(name)?;
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SignerKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Reads `PRIVATE+KEY+<name>+<hash>+<base64>`.
    pub fn parse(text: &str) -> Result<SignerKey, KeyError> {
        const SHAPE: &str = "PRIVATE+KEY+<name>+<8 hex digits>+<base64 of 0x01 and a 32-byte seed>";
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(KeyError::Format("private", SHAPE))?;
        let (name, hash, seed) = split_key(rest, "private", SHAPE)?;
        let key = SignerKey {
            name,
            key: SigningKey::from_bytes(&seed),
        };
        let computed = hash_text(key.verifier().id());
        if computed != hash {
            return Err(KeyError::Hash {
                given: hash,
                computed,
            });
        }
        Ok(key)
    }

    /// The private key in signed-note form: a secret, for the key file only.
    pub fn to_private_text(&self) -> String {
        let mut data = vec![ED25519];
        data.extend_from_slice(self.key.as_bytes());
        let text = format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hash_text(self.verifier().id()),
            STANDARD.encode(&data)
        );
        data.fill(0);
        text
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifier(&self) -> VerifierKey {
        VerifierKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// A verifier key, `<name>+<hash>+<base64(0x01 || public key)>`: what an auditor is given.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key: VerifyingKey,
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut data = vec![ED25519];
        data.extend_from_slice(self.key.as_bytes());
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hash_text(self.id()),
            STANDARD.encode(data)
        )
    }
}

impl std::str::FromStr for VerifierKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<VerifierKey, KeyError> {
        const SHAPE: &str = "<name>+<8 hex digits>+<base64 of 0x01 and a 32-byte public key>";
        let (name, hash, public) = split_key(text, "verifier", SHAPE)?;
        let key =
            VerifyingKey::from_bytes(&public).map_err(|_| KeyError::Format("verifier", SHAPE))?;
        let verifier = VerifierKey { name, key };
        let computed = hash_text(verifier.id());
        if computed != hash {
            return Err(KeyError::Hash {
                given: hash,
                computed,
            });
        }
        Ok(verifier)
    }
}

impl VerifierKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key ID of its plain Ed25519 signatures.
    pub fn id(&self) -> [u8; 4] {
        key_id(&self.name, ED25519, &self.key)
    }

    /// The key ID of its timestamped cosignatures.
    pub(crate) fn cosignature_id(&self) -> [u8; 4] {
        key_id(&self.name, COSIGNATURE, &self.key)
    }

    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.key.verify_strict(message, &signature).is_ok()
            && self.key.verify(message, &signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_what_does_not_fit() {
        let key = SignerKey::generate("audit.example/log").unwrap();
        let private = key.to_private_text();
        assert!(
            private.starts_with("PRIVATE+KEY+audit.example/log+"),
            "{private}"
        );
        let again = SignerKey::parse(&private).unwrap();
        assert_eq!(again.verifier(), key.verifier());
        let verifier = key.verifier().to_string();
        assert_eq!(verifier.parse::<VerifierKey>().unwrap(), key.verifier());
        // The key data is everything after the fourth '+' (base64 holds '+' too).
        let data = private.splitn(5, '+').nth(4).unwrap();
        assert!(data.len() > 40, "{private}");
        assert!(!format!("{key:?}").contains(data));

        // Another name with the same key material, or a changed hash: refused.
        let (_, rest) = verifier.split_once('+').unwrap();
        assert!(matches!(
            format!("other.example+{rest}").parse::<VerifierKey>(),
            Err(KeyError::Hash { .. })
        ));
        for bad in ["", "name", "a b+00000000+AQ==", "n+zzzzzzzz+AQ=="] {
            assert!(bad.parse::<VerifierKey>().is_err(), "{bad}");
        }
        assert!(SignerKey::generate("has space").is_err());
        assert!(SignerKey::generate("has+plus").is_err());
        assert!(SignerKey::parse(&verifier).is_err());
    }

    /// The key from golang.org/x/mod/sumdb/note's documentation and tests: its hash is the one
    /// Go computes.
    #[test]
    fn the_go_example_key_has_the_go_hash() {
        let vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        let parsed: VerifierKey = vkey.parse().unwrap();
        assert_eq!(parsed.to_string(), vkey);
        let skey = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
        let signer = SignerKey::parse(skey).unwrap();
        assert_eq!(signer.verifier().to_string(), vkey);
        assert_eq!(signer.to_private_text(), skey);
    }
}
