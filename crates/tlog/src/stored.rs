//! Which complete subtrees a log stores, and how every other is computed from them.
//!
//! Stored are the leaves (level 0) and the complete subtrees of height 8, 16, 24, … (level
//! 1, 2, 3, …): the entries of the tiles of C2SP tlog-tiles, one row each instead of 256 to a
//! tile, so that a tile never has to be rewritten as it fills. A complete subtree of another
//! height `h` is the perfect tree over `2^(h mod 8)` consecutive stored nodes of the level
//! below it: at most 128 hashes to read and 127 to compute. Storage beyond the leaves is
//! 1/255 of a hash per leaf.

use crate::hash::Hash;
use crate::tree::{Subtree, root};

/// Heights between stored levels: the tile height of C2SP tlog-tiles.
pub const TILE_HEIGHT: u32 = 8;

/// `count` consecutive stored nodes of `level` from `first` (level 0: leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRange {
    pub level: u32,
    pub first: u64,
    pub count: u64,
}

/// The stored nodes a complete subtree's hash is computed from (one node when it is stored
/// itself).
pub fn stored_range(s: Subtree) -> StoredRange {
    let level = s.height / TILE_HEIGHT;
    let rest = s.height % TILE_HEIGHT;
    StoredRange {
        level,
        first: s.index << rest,
        count: 1 << rest,
    }
}

/// A complete subtree's hash from the stored nodes [`stored_range`] names, in order.
pub fn subtree_hash(stored: &[Hash]) -> Hash {
    debug_assert!(stored.len().is_power_of_two());
    root(stored)
}

/// The stored node a complete subtree is, if it is one: `(level, index)`.
pub fn stored_node(s: Subtree) -> Option<(u32, u64)> {
    s.height
        .is_multiple_of(TILE_HEIGHT)
        .then_some((s.height / TILE_HEIGHT, s.index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;

    /// A subtree computed from its stored range equals the one computed from its leaves, for
    /// every height from 0 to 17.
    #[test]
    fn every_subtree_is_computed_from_its_stored_range() {
        let leaves: Vec<Hash> = (0..(1u32 << 18))
            .map(|i| leaf_hash(&i.to_le_bytes()))
            .collect();
        let level = |l: u32| -> Vec<Hash> {
            let width = 1usize << (l * TILE_HEIGHT);
            leaves.chunks(width).map(root).collect()
        };
        let levels = [level(0), level(1), level(2)];
        for height in 0..18u32 {
            for index in [0u64, 1, (1 << (17 - height.min(17))) - 1] {
                let s = Subtree { height, index };
                if s.first_leaf() + s.leaves() > leaves.len() as u64 {
                    continue;
                }
                let want = root(&leaves[s.first_leaf() as usize..][..s.leaves() as usize]);
                let r = stored_range(s);
                let stored = &levels[r.level as usize][r.first as usize..][..r.count as usize];
                assert_eq!(subtree_hash(stored), want, "{s:?}");
                assert_eq!(stored_node(s).is_some(), r.count == 1, "{s:?}");
            }
        }
    }
}
