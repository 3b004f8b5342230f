//! Checkpoints (C2SP tlog-checkpoint) as signed notes (C2SP signed-note).
//!
//! A checkpoint's text is three lines: the origin (`<log name>/<tenant>`), the tree size in
//! decimal, the root hash in base64. Its note carries two signature lines by the log's key:
//! the plain Ed25519 note signature (type 0x01), which every note verifier checks, and a
//! timestamped cosignature (C2SP tlog-cosignature, type 0x04, a different key ID, so plain
//! verifiers ignore it) over `cosignature/v1\ntime <unix seconds>\n` and the text: the
//! verifiable time the checkpoint was signed, which says how fresh it is.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::hash::Hash;
use crate::keys::{SignerKey, VerifierKey};

/// A note that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("not a checkpoint: {0}")]
    Checkpoint(&'static str),
    #[error("not a signed note: {0}")]
    Malformed(&'static str),
    #[error("no signature by the key {0} verifies")]
    Unverified(String),
    #[error("a signature of the key {0} does not verify")]
    BadSignature(String),
}

/// A tree head: origin, size, root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: three lines, each ending in a newline.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// Reads a checkpoint's text (extension lines after the third are allowed and ignored).
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let mut lines = text.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::Checkpoint("no origin line"))?;
        let size = lines
            .next()
            .filter(|s| !s.is_empty() && (s == &"0" || !s.starts_with('0')))
            .and_then(|s| s.parse().ok())
            .ok_or(NoteError::Checkpoint("the second line is not a tree size"))?;
        let root: Hash = lines
            .next()
            .and_then(|r| STANDARD.decode(r).ok())
            .and_then(|r| r.try_into().ok())
            .ok_or(NoteError::Checkpoint(
                "the third line is not a base64 SHA-256 root",
            ))?;
        if !text.ends_with('\n') {
            return Err(NoteError::Checkpoint("the text does not end in a newline"));
        }
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        })
    }

    /// The signed note: the text, a blank line, the Ed25519 signature and the timestamped
    /// cosignature of `now` (Unix seconds).
    pub fn sign(&self, key: &SignerKey, now: u64) -> String {
        let text = self.text();
        let verifier = key.verifier();
        let mut plain = verifier.id().to_vec();
        plain.extend_from_slice(&key.sign(text.as_bytes()));
        let mut timed = verifier.cosignature_id().to_vec();
        timed.extend_from_slice(&now.to_be_bytes());
        timed.extend_from_slice(&key.sign(cosigned_message(now, &text).as_bytes()));
        format!(
            "{text}\n\u{2014} {name} {}\n\u{2014} {name} {}\n",
            STANDARD.encode(plain),
            STANDARD.encode(timed),
            name = key.name()
        )
    }
}

/// A C2SP signed note of any `text` (which must end in a newline and hold no blank line):
/// the text, a blank line, and one Ed25519 signature line by `key`. Retention receipts are
/// such notes; [`open_note`] verifies them.
pub fn sign_note(text: &str, key: &SignerKey) -> String {
    let mut plain = key.verifier().id().to_vec();
    plain.extend_from_slice(&key.sign(text.as_bytes()));
    format!(
        "{text}\n\u{2014} {} {}\n",
        key.name(),
        STANDARD.encode(plain)
    )
}

fn cosigned_message(time: u64, text: &str) -> String {
    format!("cosignature/v1\ntime {time}\n{text}")
}

/// A checkpoint whose note verified, and when it was signed (from its timestamped
/// cosignature, when it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    pub signed_at: Option<u64>,
}

/// A signature line: the key name and the decoded signature (key ID first).
type SignatureLine<'n> = (&'n str, Vec<u8>);

/// Splits a note into its text (with its final newline) and its signature lines.
fn split_note(note: &str) -> Result<(&str, Vec<SignatureLine<'_>>), NoteError> {
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed("it holds control characters"));
    }
    let body = note
        .strip_suffix('\n')
        .ok_or(NoteError::Malformed("it does not end in a newline"))?;
    let split = body
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    let text = &note[..=split];
    let mut signatures = Vec::new();
    for line in body[split + 2..].split('\n') {
        let rest = line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed(
            "a signature line does not start with an em dash",
        ))?;
        let (name, data) = rest
            .split_once(' ')
            .ok_or(NoteError::Malformed("a signature line has no signature"))?;
        let data = STANDARD
            .decode(data)
            .map_err(|_| NoteError::Malformed("a signature is not base64"))?;
        if data.len() < 4 {
            return Err(NoteError::Malformed(
                "a signature is shorter than its key ID",
            ));
        }
        signatures.push((name, data));
    }
    if signatures.is_empty() {
        return Err(NoteError::Malformed("no signature lines"));
    }
    Ok((text, signatures))
}

/// Verifies a note's text against `key` (C2SP signed-note: signatures of other keys are
/// ignored; one of `key` that fails refuses the note; none that verifies refuses it too) and
/// returns the text.
pub fn open_note<'n>(note: &'n str, key: &VerifierKey) -> Result<&'n str, NoteError> {
    let (text, signatures) = split_note(note)?;
    let mut verified = false;
    for (name, data) in &signatures {
        if *name == key.name() && data[..4] == key.id() {
            if !key.verify(text.as_bytes(), &data[4..]) {
                return Err(NoteError::BadSignature(key.to_string()));
            }
            verified = true;
        }
    }
    if verified {
        Ok(text)
    } else {
        Err(NoteError::Unverified(key.to_string()))
    }
}

/// Verifies a checkpoint note against `key` and reads it, with its signing time when its
/// timestamped cosignature by the same key verifies (one that does not refuses the note).
pub fn open_checkpoint(note: &str, key: &VerifierKey) -> Result<SignedCheckpoint, NoteError> {
    let text = open_note(note, key)?;
    let checkpoint = Checkpoint::parse(text)?;
    let (_, signatures) = split_note(note)?;
    let mut signed_at = None;
    for (name, data) in &signatures {
        if *name == key.name() && data[..4] == key.cosignature_id() {
            let Some(time) = data
                .get(4..12)
                .map(|t| u64::from_be_bytes(t.try_into().expect("eight bytes")))
            else {
                return Err(NoteError::BadSignature(key.to_string()));
            };
            if !key.verify(cosigned_message(time, text).as_bytes(), &data[12..]) {
                return Err(NoteError::BadSignature(key.to_string()));
            }
            signed_at = Some(signed_at.map_or(time, |t: u64| t.max(time)));
        }
    }
    Ok(SignedCheckpoint {
        checkpoint,
        signed_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// golang.org/x/mod/sumdb/note's example: Ed25519 is deterministic, so signing its text
    /// with its key gives its signature, and its note opens with its verifier key.
    #[test]
    fn the_go_example_note() {
        let key = SignerKey::parse(
            "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        )
        .unwrap();
        let text = "If you think cryptography is the answer to your problem,\n\
                    then you don't know what your problem is.\n";
        let mut sig = key.verifier().id().to_vec();
        sig.extend_from_slice(&key.sign(text.as_bytes()));
        let expected = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=";
        assert_eq!(STANDARD.encode(&sig), expected);
        let note = format!("{text}\n\u{2014} PeterNeumann {expected}\n");
        assert_eq!(sign_note(text, &key), note);
        assert_eq!(open_note(&note, &key.verifier()).unwrap(), text);
        let altered = note.replace("problem is", "problem was");
        assert!(matches!(
            open_note(&altered, &key.verifier()),
            Err(NoteError::BadSignature(_))
        ));
    }

    #[test]
    fn checkpoints_sign_open_and_carry_their_time() {
        let key = SignerKey::generate("audit.example/log").unwrap();
        let cp = Checkpoint {
            origin: "audit.example/log/acme".into(),
            size: 42,
            root: [7u8; 32],
        };
        let note = cp.sign(&key, 1_764_000_000);
        let opened = open_checkpoint(&note, &key.verifier()).unwrap();
        assert_eq!(opened.checkpoint, cp);
        assert_eq!(opened.signed_at, Some(1_764_000_000));
        // A plain note verifier (the 0x01 signature alone) accepts it too.
        assert!(open_note(&note, &key.verifier()).is_ok());
        // Another key's verifier finds no signature of its own.
        let other = SignerKey::generate("audit.example/log").unwrap();
        assert!(matches!(
            open_checkpoint(&note, &other.verifier()),
            Err(NoteError::Unverified(_))
        ));
        // A changed size, or a changed time in the cosignature, is refused.
        assert!(open_checkpoint(&note.replacen("\n42\n", "\n43\n", 1), &key.verifier()).is_err());
        let lines: Vec<&str> = note.lines().collect();
        let (name, data) = lines[5]
            .trim_start_matches("\u{2014} ")
            .split_once(' ')
            .unwrap();
        let mut bytes = STANDARD.decode(data).unwrap();
        bytes[11] ^= 1;
        let forged = format!(
            "{}\n\n{}\n\u{2014} {name} {}\n",
            lines[..3].join("\n"),
            lines[4],
            STANDARD.encode(bytes)
        );
        assert!(matches!(
            open_checkpoint(&forged, &key.verifier()),
            Err(NoteError::BadSignature(_))
        ));
        for bad in ["", "a\n1\n", "a\n01\nAAAA\n", "a\nx\nAAAA\n", "\n1\nAAAA\n"] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad:?}");
        }
    }
}
