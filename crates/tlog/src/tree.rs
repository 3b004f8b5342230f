//! The Merkle tree hash of ranges of leaves, and inclusion and consistency proofs, as RFC 9162
//! §2.1 defines them (the same trees as RFC 6962).
//!
//! A proof is a list of ranges of leaves whose Merkle tree hashes are the proof's hashes
//! ([`inclusion_ranges`], [`consistency_ranges`]). Every such range is made of complete
//! subtrees (a perfect tree of `2^height` leaves starting at a multiple of its size): the
//! caller fetches those ([`Range::subtrees`]), and [`Range::hash`] combines them. So a store
//! that keeps complete subtrees answers a proof in a few reads, without the leaves.

use crate::hash::{Hash, empty_root, leaf_hash, node_hash};

/// A complete subtree: `2^height` leaves from `index << height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subtree {
    pub height: u32,
    pub index: u64,
}

impl Subtree {
    /// The first leaf it covers.
    pub fn first_leaf(self) -> u64 {
        self.index << self.height
    }

    /// How many leaves it covers.
    pub fn leaves(self) -> u64 {
        1 << self.height
    }
}

/// The leaves `start..end` of a tree, whose Merkle tree hash (RFC 9162 `MTH`) a proof holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// The largest power of two smaller than `n` (`n > 1`): where `MTH` splits `n` leaves.
fn split(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

impl Range {
    /// The complete subtrees that make up this range, left to right: `MTH` of a range of `s`
    /// leaves splits at the largest power of two below `s`, so the range is a perfect tree or
    /// a perfect left part followed by the rest, recursively.
    pub fn subtrees(self) -> Vec<Subtree> {
        let mut out = Vec::new();
        let (mut start, end) = (self.start, self.end);
        while start < end {
            let size = end - start;
            let part = if size.is_power_of_two() {
                size
            } else {
                split(size)
            };
            debug_assert_eq!(start % part, 0, "a range of a proof starts on its parts");
            out.push(Subtree {
                height: part.trailing_zeros(),
                index: start / part,
            });
            start += part;
        }
        out
    }

    /// The range's `MTH`, from the hashes of its [`Range::subtrees`] in order.
    pub fn hash(self, subtree_hashes: &[Hash]) -> Hash {
        fold_right(subtree_hashes)
    }
}

/// `MTH` of consecutive complete subtrees, each larger than the next (the last may be the
/// same size when the range is perfect): the rightmost pair joins first.
pub fn fold_right(hashes: &[Hash]) -> Hash {
    match hashes.split_last() {
        None => empty_root(),
        Some((last, rest)) => rest.iter().rev().fold(*last, |acc, h| node_hash(h, &acc)),
    }
}

/// The ranges whose hashes prove leaf `index` in a tree of `size` leaves (RFC 9162 `PATH`),
/// nearest the leaf first.
pub fn inclusion_ranges(index: u64, size: u64) -> Vec<Range> {
    assert!(index < size, "leaf {index} is not in a tree of {size}");
    let mut out = Vec::new();
    path(index, 0, size, &mut out);
    out
}

fn path(m: u64, start: u64, n: u64, out: &mut Vec<Range>) {
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, start, k, out);
        out.push(Range {
            start: start + k,
            end: start + n,
        });
    } else {
        path(m - k, start + k, n - k, out);
        out.push(Range {
            start,
            end: start + k,
        });
    }
}

/// The ranges whose hashes prove a tree of `old` leaves a prefix of one of `new` leaves
/// (RFC 9162 `PROOF`): empty when `old` is 0 or `old == new`.
pub fn consistency_ranges(old: u64, new: u64) -> Vec<Range> {
    assert!(
        old <= new,
        "a tree of {new} leaves cannot extend one of {old}"
    );
    let mut out = Vec::new();
    if old > 0 && old < new {
        subproof(old, 0, new, true, &mut out);
    }
    out
}

fn subproof(m: u64, start: u64, n: u64, whole: bool, out: &mut Vec<Range>) {
    if m == n {
        if !whole {
            out.push(Range {
                start,
                end: start + n,
            });
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, start, k, whole, out);
        out.push(Range {
            start: start + k,
            end: start + n,
        });
    } else {
        subproof(m - k, start + k, n - k, false, out);
        out.push(Range {
            start,
            end: start + k,
        });
    }
}

/// Why a proof does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not below the tree size {size}")]
    IndexBeyondSize { index: u64, size: u64 },
    #[error("the proof has {got} hashes; a proof for these sizes has fewer")]
    TooLong { got: usize },
    #[error("the proof has too few hashes")]
    TooShort,
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
    #[error("the older size {old} is larger than the newer size {new}")]
    SizesReversed { old: u64, new: u64 },
    #[error("equal sizes must have equal roots and an empty proof")]
    EqualSizes,
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves with `root` (RFC 9162
/// §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexBeyondSize { index, size });
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return Err(ProofError::TooLong { got: proof.len() });
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::TooShort);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `old` leaves with `old_root` is a prefix of the tree of `new`
/// leaves with `new_root` (RFC 9162 §2.1.4.2). A tree of 0 leaves is a prefix of every tree.
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old > new {
        return Err(ProofError::SizesReversed { old, new });
    }
    if old == new {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::EqualSizes)
        };
    }
    if old == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::TooLong { got: proof.len() })
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::TooShort);
    };
    let (mut fnode, mut snode) = (old - 1, new - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return Err(ProofError::TooLong { got: proof.len() });
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::TooShort);
    }
    if fr != *old_root || sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// `MTH` of `leaves` (leaf hashes) straight from the definition: the reference the tests
/// and `auditbridge log verify` compute a whole tree with.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The hashes of a proof's ranges over known leaf hashes (for a whole tree in memory:
/// `log verify`, tests).
pub fn range_hashes(ranges: &[Range], leaves: &[Hash]) -> Vec<Hash> {
    ranges
        .iter()
        .map(|r| root(&leaves[r.start as usize..r.end as usize]))
        .collect()
}

/// Leaf hashes of byte strings, for tests and whole-tree checks.
pub fn leaf_hashes<B: AsRef<[u8]>>(leaves: &[B]) -> Vec<Hash> {
    leaves.iter().map(|l| leaf_hash(l.as_ref())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Hash {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// certificate-transparency's merkle_tree_test.cc: its eight inputs (hex), the roots of
    /// their prefixes, some inclusion paths and consistency proofs.
    const INPUTS: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn inputs() -> Vec<Hash> {
        INPUTS
            .iter()
            .map(|h| {
                let bytes: Vec<u8> = (0..h.len() / 2)
                    .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                    .collect();
                leaf_hash(&bytes)
            })
            .collect()
    }

    #[test]
    fn known_roots_paths_and_proofs() {
        let leaves = inputs();
        for n in 1..=8 {
            assert_eq!(root(&leaves[..n]), unhex(ROOTS[n - 1]), "root of {n}");
        }
        // (leaf index, tree size, path)
        let paths: [(u64, u64, &[&str]); 3] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (index, size, want) in paths {
            let got = range_hashes(&inclusion_ranges(index, size), &leaves[..size as usize]);
            let want: Vec<Hash> = want.iter().map(|h| unhex(h)).collect();
            assert_eq!(got, want, "path of {index} in {size}");
            let r = unhex(ROOTS[size as usize - 1]);
            verify_inclusion(index, size, &leaves[index as usize], &got, &r).unwrap();
        }
        let proofs: [(u64, u64, &[&str]); 3] = [
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (old, new, want) in proofs {
            let got = range_hashes(&consistency_ranges(old, new), &leaves[..new as usize]);
            let want: Vec<Hash> = want.iter().map(|h| unhex(h)).collect();
            assert_eq!(got, want, "consistency {old} -> {new}");
            verify_consistency(
                old,
                new,
                &unhex(ROOTS[old as usize - 1]),
                &unhex(ROOTS[new as usize - 1]),
                &got,
            )
            .unwrap();
        }
    }

    /// Every proof for every index and pair of sizes up to 70 leaves verifies; each one
    /// altered (a hash flipped, one dropped, one added, another leaf or index) does not; and
    /// the proofs' ranges computed from their complete subtrees equal the reference.
    #[test]
    fn every_small_proof_verifies_and_every_altered_one_fails() {
        let leaves: Vec<Hash> = (0..70u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let subtree = |s: Subtree| root(&leaves[s.first_leaf() as usize..][..s.leaves() as usize]);
        for n in 1..=70u64 {
            let r = root(&leaves[..n as usize]);
            for m in 0..n {
                let ranges = inclusion_ranges(m, n);
                let proof = range_hashes(&ranges, &leaves);
                let from_subtrees: Vec<Hash> = ranges
                    .iter()
                    .map(|range| {
                        let parts: Vec<Hash> = range.subtrees().into_iter().map(subtree).collect();
                        range.hash(&parts)
                    })
                    .collect();
                assert_eq!(proof, from_subtrees, "{m} in {n}");
                let leaf = leaves[m as usize];
                verify_inclusion(m, n, &leaf, &proof, &r).unwrap();
                assert!(
                    verify_inclusion(m, n, &leaves[(m as usize + 1) % 70], &proof, &r).is_err()
                );
                // (The same proof can hold for another size with the same root: a tree of 3
                // leaves is shaped like one of 4 whose last pair is a single leaf. The size is
                // bound to the root by the signed checkpoint, not by the proof.)
                if m + 1 < n {
                    assert!(verify_inclusion(m + 1, n, &leaf, &proof, &r).is_err());
                }
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i][0] ^= 1;
                    assert!(verify_inclusion(m, n, &leaf, &bad, &r).is_err());
                    let mut short = proof.clone();
                    short.remove(i);
                    assert!(verify_inclusion(m, n, &leaf, &short, &r).is_err());
                }
                let mut long = proof.clone();
                long.push(r);
                assert!(verify_inclusion(m, n, &leaf, &long, &r).is_err());
            }
            for old in 0..=n {
                let old_root = root(&leaves[..old as usize]);
                let proof = range_hashes(&consistency_ranges(old, n), &leaves);
                verify_consistency(old, n, &old_root, &r, &proof).unwrap();
                if old > 0 && old < n {
                    let other = root(&leaves[1..=old as usize]);
                    assert!(verify_consistency(old, n, &other, &r, &proof).is_err());
                    for i in 0..proof.len() {
                        let mut bad = proof.clone();
                        bad[i][31] ^= 0x80;
                        assert!(verify_consistency(old, n, &old_root, &r, &bad).is_err());
                    }
                    assert!(verify_consistency(old, n, &old_root, &r, &proof[1..]).is_err());
                }
            }
        }
    }
}
