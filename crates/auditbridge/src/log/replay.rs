//! Replaying a tenant's log entry by entry against what is claimed about it: the leaf hashes
//! the log stored, its stored subtrees, the commit order it was appended in, and signed
//! checkpoints of its tree. What `log verify` does with a bundle and `log audit` with the
//! database; each difference is a [`Finding`] that names the index and, where known, the
//! event.

use std::collections::BTreeMap;

use auditbridge_store::Position;
use auditbridge_store::log::StoredNodes;
use auditbridge_tlog::stored::stored_node;
use auditbridge_tlog::{Frontier, Hash, leaf_hash};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Findings printed per tenant; the rest are counted.
const SHOWN: usize = 50;

/// One log entry as the replay sees it.
#[derive(Debug, Default)]
pub(crate) struct Entry<'a> {
    /// The index the log gives it.
    pub index: u64,
    /// The event's id, where known.
    pub event_id: Option<uuid::Uuid>,
    /// The event's bytes; `None` when the event is gone.
    pub bytes: Option<&'a [u8]>,
    /// The leaf hash the log stored when it appended the entry, where known.
    pub stored_leaf: Option<&'a [u8]>,
    /// The event's place in commit order, where known.
    pub position: Option<Position>,
}

/// A claim about the tree at some size: a checkpoint's root.
#[derive(Debug, Clone)]
struct Claim {
    label: String,
    root: Hash,
}

/// The replay of one tenant's log.
#[derive(Debug)]
pub(crate) struct Replay {
    tenant: String,
    tree: Frontier,
    claims: BTreeMap<u64, Vec<Claim>>,
    nodes: Option<StoredNodes>,
    previous: Option<(Position, u64, Option<uuid::Uuid>)>,
    findings: Vec<String>,
    found: usize,
    /// Of `found`, those resting only on what is not signed (a bundle's `leaves.txt`).
    soft: usize,
    /// Whether the stored leaf hashes and positions are only hints (a bundle's, unsigned),
    /// not evidence (the database's, which proofs are served from).
    stored_unsigned: bool,
    checked: usize,
    /// Log indexes whose payloads signed retention receipts say expired.
    expired: Vec<(u64, u64)>,
    /// Entries without payload that a receipt covers.
    expired_seen: u64,
    /// Entries without payload that no receipt read so far covers: a finding at
    /// [`Replay::finish`] unless one read later does ([`Replay::vouch`]).
    unvouched: Vec<(u64, Option<uuid::Uuid>)>,
}

impl Replay {
    pub(crate) fn new(tenant: &str) -> Replay {
        Replay {
            tenant: tenant.to_owned(),
            tree: Frontier::new(),
            claims: BTreeMap::new(),
            nodes: None,
            previous: None,
            findings: Vec::new(),
            found: 0,
            soft: 0,
            stored_unsigned: false,
            checked: 0,
            expired: Vec::new(),
            expired_seen: 0,
            unvouched: Vec::new(),
        }
    }

    /// The payloads at these log indexes (half-open ranges) expired under signed receipts:
    /// missing, they are no finding (their stored leaves still count).
    /// Also for entries already replayed: a reader that reads the receipts after the events
    /// sees every drop that removed one of them.
    pub(crate) fn vouch(&mut self, ranges: &[(u64, u64)]) {
        self.expired.extend_from_slice(ranges);
        let before = self.unvouched.len();
        self.unvouched
            .retain(|(i, _)| !ranges.iter().any(|&(a, b)| a <= *i && *i < b));
        self.expired_seen += (before - self.unvouched.len()) as u64;
    }

    /// The stored leaf hashes and positions are unsigned hints: a difference they alone show
    /// is a note, not tampering, when the signed roots hold.
    pub(crate) fn with_unsigned_stored(mut self) -> Replay {
        self.stored_unsigned = true;
        self
    }

    /// A finding that rests on the stored leaf hashes or positions.
    fn find_stored(&mut self, index: u64, event: Option<uuid::Uuid>, what: String) {
        if self.stored_unsigned {
            self.soft += 1;
        }
        self.find(Some(index), event, what);
    }

    /// Also checks every stored subtree as the leaves complete it.
    pub(crate) fn with_nodes(mut self, nodes: StoredNodes) -> Replay {
        self.nodes = Some(nodes);
        self
    }

    /// The tree must have `root` when it reaches `size` leaves (`label` names the claim).
    pub(crate) fn expect(&mut self, size: u64, root: Hash, label: String) {
        let claims = self.claims.entry(size).or_default();
        // An idle tenant's checkpoint is signed again every minute: the same claim, once.
        if claims.iter().any(|c| c.root == root) {
            self.checked += 1;
            return;
        }
        claims.push(Claim { label, root });
    }

    /// Records a finding about the log as a whole or one entry (`index`, `event`).
    pub(crate) fn find(
        &mut self,
        index: Option<u64>,
        event: Option<uuid::Uuid>,
        what: impl std::fmt::Display,
    ) {
        self.found += 1;
        if self.findings.len() < SHOWN {
            let mut line = format!("tenant {}", self.tenant);
            if let Some(i) = index {
                line.push_str(&format!(", index {i}"));
            }
            if let Some(e) = event {
                line.push_str(&format!(", event {e}"));
            }
            self.findings.push(format!("{line}: {what}"));
        }
    }

    /// Replays the next entry.
    pub(crate) fn push(&mut self, entry: Entry<'_>) {
        let Entry {
            index,
            event_id,
            bytes,
            stored_leaf,
            position,
        } = entry;
        let expected = self.tree.size();
        if index != expected {
            self.find(
                Some(expected),
                None,
                format!(
                    "the log has no entry at indexes {expected} to {}: entries were removed",
                    index.saturating_sub(1)
                ),
            );
        }
        let stored: Option<Hash> = match stored_leaf {
            Some(s) => match <Hash>::try_from(s) {
                Ok(h) => Some(h),
                Err(_) => {
                    self.find(
                        Some(index),
                        event_id,
                        format!("the log's leaf hash is {} bytes, not 32", s.len()),
                    );
                    None
                }
            },
            None => None,
        };
        let leaf = match bytes {
            Some(b) => {
                let computed = leaf_hash(b);
                if let Some(s) = stored
                    && s != computed
                {
                    self.find_stored(
                        index,
                        event_id,
                        format!(
                            "the event was changed after it was sequenced: its bytes hash to {}, \
                             the log's leaf is {}",
                            STANDARD.encode(computed),
                            STANDARD.encode(s)
                        ),
                    );
                }
                computed
            }
            None if self.expired.iter().any(|&(a, b)| a <= index && index < b) => {
                self.expired_seen += 1;
                stored.unwrap_or([0; 32])
            }
            None => {
                self.unvouched.push((index, event_id));
                stored.unwrap_or([0; 32])
            }
        };
        if let Some(p) = position {
            // Within one outbox generation only: a rebase starts a new order, and which
            // generation an old row falls in is read from today's table.
            if let Some((before, before_index, before_event)) = &self.previous
                && p.generation == before.generation
                && p.key() <= before.key()
            {
                let what = format!(
                    "the log was reordered: this event was committed before index {before_index}{}, \
                     which the log has ahead of it",
                    before_event.map_or(String::new(), |e| format!(" (event {e})"))
                );
                self.find_stored(index, event_id, what);
            }
            self.previous = Some((p, index, event_id));
        }
        for (subtree, hash) in self.tree.push(leaf) {
            let Some(nodes) = &mut self.nodes else { break };
            let Some(key) = stored_node(subtree) else {
                continue;
            };
            let first = subtree.first_leaf();
            let last = first + subtree.leaves() - 1;
            match nodes.remove(&key) {
                Some(h) if h.as_slice() == hash => {}
                Some(_) => self.find(
                    Some(first),
                    None,
                    format!(
                        "the stored subtree over indexes {first} to {last} (level {}, node {}) \
                         differs from the one its events give: proofs through it are wrong",
                        key.0, key.1
                    ),
                ),
                None => self.find(
                    Some(first),
                    None,
                    format!(
                        "the stored subtree over indexes {first} to {last} (level {}, node {}) \
                         is missing",
                        key.0, key.1
                    ),
                ),
            }
        }
        self.check_claims();
    }

    fn check_claims(&mut self) {
        let size = self.tree.size();
        let Some(claims) = self.claims.remove(&size) else {
            return;
        };
        let root = self.tree.root();
        for claim in claims {
            self.checked += 1;
            if claim.root != root {
                self.find(
                    None,
                    None,
                    format!(
                        "{} says the first {size} entries have root {}, they have {}: an event \
                         among them was changed, removed, added or moved",
                        claim.label,
                        STANDARD.encode(claim.root),
                        STANDARD.encode(root)
                    ),
                );
            }
        }
    }

    /// Ends the replay: claims beyond the log's end mean it was cut back. Returns the
    /// findings to print (at most [`SHOWN`]), how many there were in all, and how many
    /// claims were checked.
    pub(crate) fn finish(mut self) -> Outcome {
        for (index, event_id) in std::mem::take(&mut self.unvouched) {
            self.find(
                Some(index),
                event_id,
                "the event is gone: the log holds it, the trail does not, and no retention \
                 receipt covers it (deleted)",
            );
        }
        // The empty tree's claims.
        if self.tree.size() == 0 {
            self.check_claims();
        }
        let size = self.tree.size();
        let beyond: Vec<(u64, Claim)> = std::mem::take(&mut self.claims)
            .into_iter()
            .flat_map(|(s, claims)| claims.into_iter().map(move |c| (s, c)))
            .collect();
        for (claimed, claim) in beyond {
            self.find(
                Some(size),
                None,
                format!(
                    "the log was cut back: {} is of {claimed} entries, the log has {size}",
                    claim.label
                ),
            );
        }
        Outcome {
            size,
            findings: self.findings,
            found: self.found,
            soft: self.soft,
            checked: self.checked,
            expired: self.expired_seen,
        }
    }
}

/// What a replay found.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub size: u64,
    pub findings: Vec<String>,
    pub found: usize,
    /// Of `found`, those resting only on unsigned hints (see [`Replay::with_unsigned_stored`]).
    pub soft: usize,
    pub checked: usize,
    /// Entries whose payload expired under a signed receipt.
    pub expired: u64,
}

impl Outcome {
    /// Prints the findings to standard output, one per line, and the count of the rest.
    pub(crate) fn print_findings(&self) {
        for f in &self.findings {
            println!("TAMPERED {f}");
        }
        if self.found > self.findings.len() {
            println!(
                "TAMPERED … and {} more findings",
                self.found - self.findings.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use auditbridge_tlog::tree::root;

    use super::*;

    /// Ten events, their leaf hashes, positions in commit order, and the root of all ten.
    fn log() -> (Vec<Vec<u8>>, Vec<Hash>, Vec<Position>, Hash) {
        let events: Vec<Vec<u8>> = (0..10).map(|i| format!("{{\"n\": {i}}}").into()).collect();
        let leaves: Vec<Hash> = events.iter().map(|e| leaf_hash(e)).collect();
        let positions = (0..10).map(|i| Position::new(0, "100", i)).collect();
        let r = root(&leaves);
        (events, leaves, positions, r)
    }

    fn replay(
        events: &[Option<&[u8]>],
        leaves: &[Hash],
        positions: &[Position],
        claim: Hash,
    ) -> Outcome {
        let mut r = Replay::new("t");
        r.expect(10, claim, "the checkpoint".into());
        for (i, bytes) in events.iter().enumerate() {
            r.push(Entry {
                index: i as u64,
                event_id: None,
                bytes: *bytes,
                stored_leaf: Some(&leaves[i]),
                position: Some(positions[i].clone()),
            });
        }
        r.finish()
    }

    #[test]
    fn an_intact_log_has_no_findings_and_each_tampering_one() {
        let (events, leaves, positions, r) = log();
        let all: Vec<Option<&[u8]>> = events.iter().map(|e| Some(e.as_slice())).collect();
        let ok = replay(&all, &leaves, &positions, r);
        assert_eq!((ok.found, ok.checked, ok.size), (0, 1, 10));

        // A changed event: named by its index, and the root fails.
        let mut changed = all.clone();
        changed[3] = Some(b"{\"n\": 33}");
        let out = replay(&changed, &leaves, &positions, r);
        assert!(out.findings[0].contains("index 3") && out.findings[0].contains("changed"));
        assert!(out.findings.iter().any(|f| f.contains("root")));

        // A gone event keeps its stored leaf: only the loss is reported.
        let mut gone = all.clone();
        gone[2] = None;
        let out = replay(&gone, &leaves, &positions, r);
        assert_eq!(out.found, 1);
        assert!(out.findings[0].contains("index 2") && out.findings[0].contains("gone"));

        // Two entries swapped with their leaves: the commit order names them, the root fails.
        let (mut ev, mut lv, mut ps) = (all.clone(), leaves.clone(), positions.clone());
        ev.swap(1, 5);
        lv.swap(1, 5);
        ps.swap(1, 5);
        let out = replay(&ev, &lv, &ps, r);
        assert!(out.findings[0].contains("index 2") && out.findings[0].contains("reordered"));
        assert!(out.findings.iter().any(|f| f.contains("index 5")));
        assert!(out.findings.iter().any(|f| f.contains("root")));

        // Cut back: the claim lies beyond the end.
        let out = replay(&all[..7], &leaves, &positions, r);
        assert!(out.findings.iter().any(|f| f.contains("cut back")));

        // The same claim signed again counts once, and still fails when wrong.
        let mut twice = Replay::new("t");
        twice.expect(1, r, "a".into());
        twice.expect(1, r, "b".into());
        twice.push(Entry {
            index: 0,
            bytes: Some(&events[0]),
            ..Entry::default()
        });
        let out = twice.finish();
        assert_eq!((out.found, out.checked), (1, 2));
    }

    #[test]
    fn a_gap_is_reported_once_and_unsigned_hints_are_soft() {
        let (events, leaves, positions, r) = log();
        let mut rp = Replay::new("t").with_unsigned_stored();
        rp.expect(10, r, "the checkpoint".into());
        for i in [0usize, 1, 4, 5] {
            rp.push(Entry {
                index: i as u64,
                bytes: Some(&events[i]),
                // A hint that is wrong at index 1.
                stored_leaf: Some(if i == 1 { &leaves[0] } else { &leaves[i] }),
                position: Some(positions[i].clone()),
                ..Entry::default()
            });
        }
        let out = rp.finish();
        assert!(out.findings.iter().any(|f| f.contains("indexes 2 to 3")));
        assert_eq!(out.soft, 1, "{:?}", out.findings);
        assert!(out.found > out.soft);
    }
}
