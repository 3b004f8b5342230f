//! The pure parts of each tenant's verifiable log, with no I/O: what the sequencer, the API,
//! `auditbridge log verify` and `log audit` compute, and what an auditor's own tools compute
//! the same way.
//!
//! - [`hash`]: RFC 6962 leaf and interior hashes.
//! - [`tree`]: the Merkle tree hash of a range of leaves from stored complete subtrees,
//!   inclusion and consistency proofs (RFC 9162 §2.1) and their verification.
//! - [`stored`]: which complete subtrees are stored (leaves, and subtrees of height 8, 16, …:
//!   the entries of C2SP tlog-tiles' tiles) and how any other is computed from them.
//! - [`frontier`]: the right edge of a growing tree, for appending leaves one by one.
//! - [`note`]: C2SP `tlog-checkpoint` text, `signed-note` Ed25519 signatures and the
//!   timestamped `tlog-cosignature` line that says when a checkpoint was signed.
//! - [`keys`]: signed-note private keys and verifier keys.

pub mod frontier;
pub mod hash;
pub mod keys;
pub mod note;
pub mod stored;
pub mod tree;

pub use frontier::Frontier;
pub use hash::{Hash, leaf_hash, node_hash};
pub use keys::{KeyError, SignerKey, VerifierKey};
pub use note::{Checkpoint, NoteError, SignedCheckpoint, open_note, sign_note};
