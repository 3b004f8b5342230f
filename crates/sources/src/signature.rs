//! The check of an incoming webhook's HMAC-SHA256 signature: the receiving side of the scheme
//! the HTTP destination signs with (`auditbridge_destinations::http::sign`), generalised to
//! configurable header names and prefix, and to body-only schemes (GitHub's
//! `X-Hub-Signature-256: sha256=<hex>`).

use auditbridge_config::ExposeSecret as _;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use crate::config::WebhookParams;

/// Why a request's signature was refused. Each is answered 401 and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing header {0}")]
    MissingHeader(String),
    #[error("header {0} is not Unix seconds")]
    BadTimestamp(String),
    /// Outside the replay window: possibly a captured request sent again.
    #[error("timestamp is {age_secs} s away from the server clock (replay window {window_secs} s)")]
    Expired { age_secs: u64, window_secs: u64 },
    /// The signature header holds no candidate of the expected shape (`<prefix><64 hex>`,
    /// at most a few), so no body could match it.
    #[error("header {0} is not of the form <prefix><hex SHA-256>")]
    Malformed(String),
    #[error("signature does not match")]
    Mismatch,
}

impl SignatureError {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SignatureError::MissingHeader(_) => "missing",
            SignatureError::BadTimestamp(_) => "bad_timestamp",
            SignatureError::Expired { .. } => "expired",
            SignatureError::Malformed(_) => "malformed",
            SignatureError::Mismatch => "mismatch",
        }
    }
}

/// What a request's headers present, checked before its body is read: the candidate digests
/// and the signed timestamp.
#[derive(Debug)]
pub struct Presented<'a> {
    digests: Vec<Vec<u8>>,
    timestamp: Option<&'a str>,
}

/// Checks everything that can be checked before the body arrives: the signature header is
/// present and holds at most [`MAX_SIGNATURES`] candidates, at least one of them
/// `<prefix><hex SHA-256>`; the timestamp header (if the scheme has one) is present, Unix
/// seconds, and inside the replay window of `now` (Unix seconds). `header` looks a header up
/// by its lowercase name. So an unsigned, stale or malformed request is refused without
/// reading a byte of its body.
pub fn check_headers<'a>(
    params: &WebhookParams,
    header: impl Fn(&str) -> Option<&'a str>,
    now: u64,
) -> Result<Presented<'a>, SignatureError> {
    let presented = header(&params.signature_header)
        .ok_or_else(|| SignatureError::MissingHeader(params.signature_header.clone()))?;
    let timestamp = match &params.timestamp_header {
        None => None,
        Some(name) => {
            let raw = header(name).ok_or_else(|| SignatureError::MissingHeader(name.clone()))?;
            let ts: u64 = raw
                .trim()
                .parse()
                .map_err(|_| SignatureError::BadTimestamp(name.clone()))?;
            let age = now.abs_diff(ts);
            if Duration::from_secs(age) > params.replay_window {
                return Err(SignatureError::Expired {
                    age_secs: age,
                    window_secs: params.replay_window.as_secs(),
                });
            }
            Some(raw.trim())
        }
    };
    // Several signatures may be presented (comma-separated), so that a sender can sign with
    // an old and a new secret while they are rotated. The candidates are capped: the MAC is
    // computed once whatever their number, but a header of thousands is no rotation.
    let candidates: Vec<&str> = presented.split(',').map(str::trim).collect();
    if candidates.len() > MAX_SIGNATURES {
        return Err(SignatureError::Malformed(params.signature_header.clone()));
    }
    let digests: Vec<Vec<u8>> = candidates
        .iter()
        .filter_map(|c| c.strip_prefix(params.signature_prefix.as_str()))
        .filter_map(|h| hex::decode(h).ok())
        .filter(|d| d.len() == DIGEST_BYTES)
        .collect();
    if digests.is_empty() {
        return Err(SignatureError::Malformed(params.signature_header.clone()));
    }
    Ok(Presented { digests, timestamp })
}

/// Checks the body against what the headers presented. The comparison is constant-time, and
/// every candidate is compared (no early exit).
pub fn verify_body(
    params: &WebhookParams,
    presented: &Presented<'_>,
    body: &[u8],
) -> Result<(), SignatureError> {
    let expected = mac(
        params.secret.expose_secret().as_bytes(),
        presented.timestamp,
        body,
    )
    .finalize()
    .into_bytes();
    let mut matches = false;
    for digest in &presented.digests {
        matches |= bool::from(expected.as_slice().ct_eq(digest.as_slice()));
    }
    if matches {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Checks a whole request: [`check_headers`], then [`verify_body`].
pub fn verify_request<'a>(
    params: &WebhookParams,
    header: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
    now: u64,
) -> Result<(), SignatureError> {
    let presented = check_headers(params, header, now)?;
    verify_body(params, &presented, body)
}

/// The header value a sender puts on `body` (for tests, benchmarks and documentation).
pub fn sign(params: &WebhookParams, timestamp: Option<u64>, body: &[u8]) -> String {
    let ts = timestamp.map(|t| t.to_string());
    let digest = mac(
        params.secret.expose_secret().as_bytes(),
        ts.as_deref(),
        body,
    )
    .finalize()
    .into_bytes();
    format!("{}{}", params.signature_prefix, hex::encode(digest))
}

/// Most signatures one request may present (enough for a rotation or two).
const MAX_SIGNATURES: usize = 4;
/// An HMAC-SHA256 digest.
const DIGEST_BYTES: usize = 32;

fn mac(secret: &[u8], timestamp: Option<&str>, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    if let Some(ts) = timestamp {
        mac.update(ts.as_bytes());
        mac.update(b".");
    }
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn params() -> WebhookParams {
        let kind = crate::test_config::load(&serde_json::json!({"name": "w", "type": "webhook",
            "params": {"secret": "whsec-0123456789abcdef"}}));
        let crate::SourceKind::Webhook(params) = kind else {
            unreachable!("a webhook")
        };
        assert_eq!(params.signature_header, "x-auditbridge-signature");
        assert_eq!(params.signature_prefix, "v1=");
        assert_eq!(params.replay_window, Duration::from_secs(300));
        params
    }

    fn check(
        p: &WebhookParams,
        headers: &[(&str, String)],
        body: &[u8],
        now: u64,
    ) -> Result<(), SignatureError> {
        let map: HashMap<&str, &str> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        verify_request(p, |name| map.get(name).copied(), body, now)
    }

    #[test]
    fn accepts_what_the_http_destination_signs() {
        let p = params();
        let body = br#"{"a":1}"#;
        let sig =
            auditbridge_destinations::http::sign(p.secret.expose_secret().as_bytes(), 1_000, body);
        assert_eq!(sig, sign(&p, Some(1_000), body));
        let headers = [
            ("x-auditbridge-timestamp", "1000".to_owned()),
            ("x-auditbridge-signature", sig.clone()),
        ];
        assert_eq!(check(&p, &headers, body, 1_010), Ok(()));
        // Another body, another timestamp, another secret: refused.
        assert_eq!(
            check(&p, &headers, b"{}", 1_010),
            Err(SignatureError::Mismatch)
        );
        let moved = [
            ("x-auditbridge-timestamp", "1001".to_owned()),
            ("x-auditbridge-signature", sig.clone()),
        ];
        assert_eq!(
            check(&p, &moved, body, 1_010),
            Err(SignatureError::Mismatch)
        );
        let mut other = params();
        other.secret = "another-secret-of-16".into();
        assert_eq!(
            check(&other, &headers, body, 1_010),
            Err(SignatureError::Mismatch)
        );
        // Rotation: either of two signatures may match.
        let both = [
            ("x-auditbridge-timestamp", "1000".to_owned()),
            (
                "x-auditbridge-signature",
                format!("v1={}, {sig}", "0f".repeat(32)),
            ),
        ];
        assert_eq!(check(&p, &both, body, 1_010), Ok(()));
        // More candidates than a rotation needs are refused outright (each would otherwise
        // cost a pass over the body).
        let many = [
            ("x-auditbridge-timestamp", "1000".to_owned()),
            (
                "x-auditbridge-signature",
                format!("{}{sig}", "v1=00,".repeat(MAX_SIGNATURES)),
            ),
        ];
        assert_eq!(
            check(&p, &many, body, 1_010),
            Err(SignatureError::Malformed("x-auditbridge-signature".into()))
        );
    }

    #[test]
    fn replay_window_and_missing_headers() {
        let p = params();
        let body = b"x";
        let headers = [
            ("x-auditbridge-timestamp", "1000".to_owned()),
            ("x-auditbridge-signature", sign(&p, Some(1000), body)),
        ];
        assert_eq!(check(&p, &headers, body, 1_300), Ok(()));
        assert_eq!(
            check(&p, &headers, body, 1_301),
            Err(SignatureError::Expired {
                age_secs: 301,
                window_secs: 300
            })
        );
        assert!(matches!(
            check(&p, &headers, body, 600),
            Err(SignatureError::Expired { .. })
        ));
        assert_eq!(
            check(&p, &headers[1..], body, 1_000),
            Err(SignatureError::MissingHeader(
                "x-auditbridge-timestamp".into()
            ))
        );
        assert_eq!(
            check(&p, &headers[..1], body, 1_000),
            Err(SignatureError::MissingHeader(
                "x-auditbridge-signature".into()
            ))
        );
        let bad_ts = [
            ("x-auditbridge-timestamp", "yesterday".to_owned()),
            ("x-auditbridge-signature", sign(&p, Some(1000), body)),
        ];
        assert!(matches!(
            check(&p, &bad_ts, body, 1_000),
            Err(SignatureError::BadTimestamp(_))
        ));
        // Not a digest (not hex, too short, another prefix): refused from the headers alone.
        for bad in ["v1=zz", "v1=00ff", "sha256=00", ""] {
            let headers = [
                ("x-auditbridge-timestamp", "1000".to_owned()),
                ("x-auditbridge-signature", bad.to_owned()),
            ];
            let map: HashMap<&str, &str> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(
                check_headers(&p, |name| map.get(name).copied(), 1_000).map(|_| ()),
                Err(SignatureError::Malformed("x-auditbridge-signature".into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn body_only_scheme() {
        let mut p = params();
        p.signature_header = "x-hub-signature-256".into();
        p.signature_prefix = "sha256=".into();
        p.timestamp_header = None;
        let body = b"{\"zen\":\"x\"}";
        let sig = sign(&p, None, body);
        assert!(sig.starts_with("sha256="));
        assert_eq!(check(&p, &[("x-hub-signature-256", sig)], body, 0), Ok(()));
    }
}
