//! The right edge of a growing tree: the complete subtrees that make up its leaves (one per
//! bit of its size). Appending a leaf joins equal subtrees; the root is their fold. This is
//! all the sequencer keeps of a tenant's tree in memory.

use crate::hash::{Hash, node_hash};
use crate::stored::TILE_HEIGHT;
use crate::tree::{Range, Subtree, fold_right};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frontier {
    size: u64,
    /// The hashes of [`Frontier::parts`] of `size`, largest first.
    hashes: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// The complete subtrees a tree of `size` leaves is made of, largest first.
    pub fn parts(size: u64) -> Vec<Subtree> {
        Range {
            start: 0,
            end: size,
        }
        .subtrees()
    }

    /// A tree of `size` leaves from the hashes of its [`Frontier::parts`]; `None` when their
    /// number does not fit the size.
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Option<Frontier> {
        (hashes.len() == size.count_ones() as usize).then_some(Frontier { size, hashes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree's root (RFC 9162 `MTH`).
    pub fn root(&self) -> Hash {
        fold_right(&self.hashes)
    }

    /// Appends a leaf. Returns the complete subtrees it completed whose height is a multiple
    /// of [`TILE_HEIGHT`] (above the leaves): the nodes a log stores.
    pub fn push(&mut self, leaf: Hash) -> Vec<(Subtree, Hash)> {
        let index = self.size;
        let mut completed = Vec::new();
        let (mut hash, mut height, mut n) = (leaf, 0u32, index);
        while n & 1 == 1 {
            let left = self.hashes.pop().expect("one part per set bit of the size");
            hash = node_hash(&left, &hash);
            height += 1;
            n >>= 1;
            if height.is_multiple_of(TILE_HEIGHT) {
                completed.push((
                    Subtree {
                        height,
                        index: ((index + 1) >> height) - 1,
                    },
                    hash,
                ));
            }
        }
        self.hashes.push(hash);
        self.size += 1;
        completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;
    use crate::tree::root;

    #[test]
    fn the_frontier_follows_the_reference_tree() {
        let leaves: Vec<Hash> = (0..70_000u32)
            .map(|i| leaf_hash(&i.to_be_bytes()))
            .collect();
        let mut f = Frontier::new();
        let mut stored = Vec::new();
        for (i, leaf) in leaves.iter().enumerate() {
            stored.extend(f.push(*leaf));
            if i < 300 || i % 9_973 == 0 {
                assert_eq!(f.root(), root(&leaves[..=i]), "size {}", i + 1);
                let parts: Vec<Hash> = Frontier::parts(f.size())
                    .into_iter()
                    .map(|s| root(&leaves[s.first_leaf() as usize..][..s.leaves() as usize]))
                    .collect();
                assert_eq!(Frontier::from_parts(f.size(), parts).unwrap(), f);
            }
        }
        // Every subtree of height 8 and 16 was completed once, with its hash.
        assert_eq!(stored.len(), 70_000 / 256 + 70_000 / 65_536);
        for (s, h) in stored {
            assert_eq!(
                h,
                root(&leaves[s.first_leaf() as usize..][..s.leaves() as usize])
            );
        }
    }
}
