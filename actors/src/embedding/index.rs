//! The key index: open addressing with linear probing over one flat, huge-page array.
//!
//! A bucket holds the key itself, so keys never collide: two keys with the same hash simply sit
//! in neighbouring buckets. Four 16-byte buckets share a cache line, and a probe almost always
//! ends in the first line, which the batch code prefetches before it probes.
//!
//! Deletion uses backward-shift (no tombstones in the index), so probe lengths do not degrade
//! as rows are evicted and re-created all day long.

use bytemuck::{Pod, Zeroable};

use super::mem::{prefetch, HugeBuf};

/// `hot` value of a row whose data lives in the on-disk tier.
pub(crate) const COLD: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct Bucket {
    pub(crate) key: u64,
    /// Row id + 1; 0 marks an empty bucket, so zeroed memory is an empty index.
    row_plus1: u32,
    /// The row's slot in the DRAM arena, or `COLD`.
    pub(crate) hot: u32,
}

impl Bucket {
    #[inline]
    pub(crate) fn row(&self) -> u32 {
        self.row_plus1 - 1
    }
}

/// The index's hash. Deliberately different from the shard function's mixer: keys in one shard
/// share structure in the routing hash, which must not become clustering in the index.
#[inline]
pub(crate) fn index_hash(key: u64) -> u64 {
    let mut z = key ^ 0x243f_6a88_85a3_08d3;
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

#[derive(Debug)]
pub(crate) struct Index {
    buckets: HugeBuf<Bucket>,
    /// log2 of the bucket count.
    bits: u32,
    len: usize,
}

/// Grow past this load factor: linear probing stays short below 0.7.
const MAX_LOAD_NUM: usize = 7;
const MAX_LOAD_DEN: usize = 10;

impl Index {
    pub(crate) fn with_capacity(rows: usize) -> Self {
        let want = (rows * MAX_LOAD_DEN / MAX_LOAD_NUM + 1).max(64);
        let bits = want.next_power_of_two().trailing_zeros();
        Self {
            buckets: HugeBuf::zeroed(1 << bits),
            bits,
            len: 0,
        }
    }

    /// Faults the bucket array's pages in now; returns the bytes.
    pub(crate) fn prefault(&mut self) -> usize {
        self.buckets.prefault()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.buckets.as_slice())
    }

    #[inline]
    fn mask(&self) -> usize {
        (1 << self.bits) - 1
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        // The top bits: the mixer's best ones.
        (hash >> (64 - self.bits)) as usize
    }

    #[inline]
    pub(crate) fn prefetch(&self, hash: u64) {
        prefetch(
            self.buckets
                .as_slice()
                .as_ptr()
                .wrapping_add(self.home(hash)),
        );
    }

    /// The position of `key`'s bucket, if present.
    #[inline]
    pub(crate) fn find(&self, key: u64, hash: u64) -> Option<usize> {
        let b = self.buckets.as_slice();
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let bucket = &b[i];
            if bucket.row_plus1 == 0 {
                return None;
            }
            if bucket.key == key {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    pub(crate) fn get(&self, pos: usize) -> &Bucket {
        &self.buckets.as_slice()[pos]
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, pos: usize) -> &mut Bucket {
        &mut self.buckets.as_mut_slice()[pos]
    }

    /// Makes room for `additional` inserts without growing, so that positions and prefetches
    /// taken during a batch stay valid for the whole batch.
    pub(crate) fn reserve(&mut self, additional: usize) {
        let need = self.len + additional;
        if need * MAX_LOAD_DEN > (1usize << self.bits) * MAX_LOAD_NUM {
            let mut grown = Index::with_capacity(need.max(self.len * 2));
            for b in self.buckets.as_slice() {
                if b.row_plus1 != 0 {
                    grown.insert_new(b.key, index_hash(b.key), b.row(), b.hot);
                }
            }
            *self = grown;
        }
    }

    /// Inserts a key known to be absent. The caller has reserved room.
    #[inline]
    pub(crate) fn insert_new(&mut self, key: u64, hash: u64, row: u32, hot: u32) -> usize {
        debug_assert!(
            (self.len + 1) * MAX_LOAD_DEN <= (1usize << self.bits) * MAX_LOAD_NUM + MAX_LOAD_DEN,
            "insert without reserve"
        );
        let mask = self.mask();
        let mut i = self.home(hash);
        let b = self.buckets.as_mut_slice();
        while b[i].row_plus1 != 0 {
            debug_assert_ne!(b[i].key, key, "insert_new of a present key");
            i = (i + 1) & mask;
        }
        b[i] = Bucket {
            key,
            row_plus1: row + 1,
            hot,
        };
        self.len += 1;
        i
    }

    /// Removes `key`, returning its bucket. Backward-shift keeps every probe chain unbroken.
    pub(crate) fn remove(&mut self, key: u64) -> Option<Bucket> {
        let pos = self.find(key, index_hash(key))?;
        let mask = self.mask();
        let bits = self.bits;
        let b = self.buckets.as_mut_slice();
        let removed = b[pos];
        let mut hole = pos;
        let mut i = (pos + 1) & mask;
        loop {
            if b[i].row_plus1 == 0 {
                break;
            }
            let home = (index_hash(b[i].key) >> (64 - bits)) as usize;
            // Move b[i] into the hole unless its home lies cyclically in (hole, i].
            let dist_home = i.wrapping_sub(home) & mask;
            let dist_hole = i.wrapping_sub(hole) & mask;
            if dist_home >= dist_hole {
                b[hole] = b[i];
                hole = i;
            }
            i = (i + 1) & mask;
        }
        b[hole] = Bucket::zeroed();
        self.len -= 1;
        Some(removed)
    }

    /// Every occupied bucket (for snapshots and tests; O(capacity)).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Bucket> {
        self.buckets.as_slice().iter().filter(|b| b.row_plus1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Xoshiro256;
    use std::collections::HashMap;

    #[test]
    fn matches_a_hashmap_under_random_inserts_and_removes() {
        let seed = crate::testkit::seed("index_vs_hashmap");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let mut idx = Index::with_capacity(0);
        let mut reference: HashMap<u64, u32> = HashMap::new();
        for step in 0..60_000u32 {
            // A small key space forces collisions, long chains and wrap-around.
            let key = rng.below(5_000) * 0x1_0000_0001;
            if rng.below(3) == 0 {
                assert_eq!(
                    idx.remove(key).map(|b| b.row()),
                    reference.remove(&key),
                    "seed {seed} step {step}"
                );
            } else if let std::collections::hash_map::Entry::Vacant(e) = reference.entry(key) {
                idx.reserve(1);
                idx.insert_new(key, index_hash(key), step, COLD);
                e.insert(step);
            }
            if step % 1000 == 0 {
                assert_eq!(idx.len(), reference.len());
                for (&k, &row) in &reference {
                    let pos = idx.find(k, index_hash(k)).expect("present key found");
                    assert_eq!(idx.get(pos).row(), row, "seed {seed}");
                }
            }
        }
        assert_eq!(idx.iter().count(), reference.len());
    }
}
