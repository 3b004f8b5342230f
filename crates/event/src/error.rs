//! Why a payload was refused: the one error type of this crate.

use std::fmt;

/// Why a payload was refused.
///
/// `kind` is a stable, low-cardinality label (used as a metric label and stored in
/// `dead_letters.kind`); `detail` is for a person: it names the field and what was expected.
/// Every `Invalid` means "this payload will never be accepted as it is", so the caller
/// dead-letters it rather than retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Invalid {
    pub kind: InvalidKind,
    pub detail: String,
}

/// The class of an [`Invalid`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidKind {
    /// Longer than the configured size limit.
    Oversize,
    /// Not UTF-8, not JSON, or JSON that is not an object.
    NotJson,
    /// A JSON object that breaks the event format: missing, unknown or malformed fields.
    Schema,
    /// A valid event published on a subject other than its own.
    SubjectMismatch,
}

impl InvalidKind {
    /// Every kind, e.g. to register metric label values up front.
    pub const ALL: [InvalidKind; 4] = [
        InvalidKind::Oversize,
        InvalidKind::NotJson,
        InvalidKind::Schema,
        InvalidKind::SubjectMismatch,
    ];

    /// The stable label: `oversize`, `not_json`, `schema` or `subject_mismatch`.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidKind::Oversize => "oversize",
            InvalidKind::NotJson => "not_json",
            InvalidKind::Schema => "schema",
            InvalidKind::SubjectMismatch => "subject_mismatch",
        }
    }
}

impl fmt::Display for InvalidKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest `detail` we produce. Details quote the offending input, and the input may be
/// a 64 KiB string; the dead-letter row keeps the whole payload anyway.
const MAX_DETAIL_BYTES: usize = 1024;

/// The longest excerpt of an input string quoted in a message.
const MAX_QUOTED_CHARS: usize = 80;

impl Invalid {
    /// Builds an `Invalid`, making `detail` safe to store: it goes into a PostgreSQL `text`
    /// column, which cannot hold U+0000, and serde's own messages may quote input verbatim.
    pub(crate) fn new(kind: InvalidKind, detail: impl Into<String>) -> Self {
        let mut detail: String = detail.into();
        if detail.contains('\0') {
            detail = detail.replace('\0', "\\0");
        }
        if detail.len() > MAX_DETAIL_BYTES {
            let mut end = MAX_DETAIL_BYTES;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
            detail.push('…');
        }
        Invalid { kind, detail }
    }

    pub(crate) fn schema(detail: impl Into<String>) -> Self {
        Invalid::new(InvalidKind::Schema, detail)
    }

    pub(crate) fn not_json(detail: impl Into<String>) -> Self {
        Invalid::new(InvalidKind::NotJson, detail)
    }
}

/// Quotes input for a message: escaped like a Rust string literal (so control characters,
/// U+0000 included, stay visible and harmless) and cut short when long.
pub(crate) fn quoted(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_labels_are_stable_and_distinct() {
        let labels: Vec<&str> = InvalidKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            labels,
            ["oversize", "not_json", "schema", "subject_mismatch"]
        );
        assert_eq!(InvalidKind::SubjectMismatch.to_string(), "subject_mismatch");
    }

    #[test]
    fn detail_never_carries_nul_and_is_bounded() {
        let invalid = Invalid::schema(format!("bad \0 {}", "x".repeat(5000)));
        assert!(!invalid.detail.contains('\0'));
        assert!(invalid.detail.starts_with("bad \\0 "));
        assert!(invalid.detail.len() <= MAX_DETAIL_BYTES + '…'.len_utf8());
        assert_eq!(invalid.to_string(), invalid.detail);
    }

    #[test]
    fn quoted_escapes_and_truncates() {
        assert_eq!(quoted("a\0b\"c"), r#""a\0b\"c""#);
        let long = "é".repeat(100);
        let q = quoted(&long);
        assert!(q.ends_with("… (200 bytes)"), "{q}");
        assert_eq!(q.matches('é').count(), MAX_QUOTED_CHARS);
    }
}
