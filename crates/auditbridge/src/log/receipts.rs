//! Retention receipts as `log audit` and `log verify` read them: a receipt signed by the
//! log's key vouches that the events at its log indexes expired under a policy, so their
//! payloads may be missing (their leaves, which the checkpoints cover, stay).

use auditbridge_tlog::VerifierKey;
use auditbridge_tlog::note::open_note;

/// The first two lines of every receipt after the origin.
const KIND: &str = "auditbridge retention receipt v1";

/// The log indexes a receipt vouches for, as half-open ranges; or why it does not count.
pub(crate) fn vouched(
    note: &str,
    key: &VerifierKey,
    tenant: &str,
) -> Result<Vec<(u64, u64)>, String> {
    let text =
        open_note(note, key).map_err(|e| format!("it does not verify with key {key}: {e}"))?;
    let mut lines = text.lines();
    let origin = format!("{}/{tenant}", key.name());
    if lines.next() != Some(origin.as_str()) {
        return Err(format!("it is not of origin {origin}"));
    }
    if lines.next() != Some(KIND) {
        return Err(format!("it is not a \"{KIND}\""));
    }
    let indexes = lines
        .find_map(|l| l.strip_prefix("indexes "))
        .ok_or("it names no indexes")?;
    parse_indexes(indexes).ok_or_else(|| format!("its indexes {indexes:?} do not read"))
}

/// `none`, or `3-9,12`: inclusive ends, as receipts write them.
pub(crate) fn parse_indexes(text: &str) -> Option<Vec<(u64, u64)>> {
    if text == "none" {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
                None => {
                    let a = part.parse::<u64>().ok()?;
                    (a, a)
                }
            };
            (a <= b).then_some((a, b.checked_add(1)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use auditbridge_tlog::{SignerKey, sign_note};

    #[test]
    fn a_receipt_vouches_for_its_indexes_only_when_signed_by_the_key_for_the_tenant() {
        let key = SignerKey::generate("audit.example/log").unwrap();
        let text = "audit.example/log/acme\nauditbridge retention receipt v1\npartition p\n\
                    indexes 0-4,9\n";
        let note = sign_note(text, &key);
        assert_eq!(
            vouched(&note, &key.verifier(), "acme"),
            Ok(vec![(0, 5), (9, 10)])
        );
        assert!(vouched(&note, &key.verifier(), "globex").is_err());
        let other = SignerKey::generate("audit.example/log").unwrap();
        assert!(vouched(&note, &other.verifier(), "acme").is_err());
        let altered = note.replace("0-4,9", "0-400");
        assert!(vouched(&altered, &key.verifier(), "acme").is_err());
        assert_eq!(parse_indexes("none"), Some(vec![]));
        assert_eq!(parse_indexes("5-3"), None);
        assert_eq!(parse_indexes("x"), None);
    }
}
