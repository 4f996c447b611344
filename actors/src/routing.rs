//! The one key-to-shard function.
//!
//! Which shard owns a key decides where rows live, what a checkpoint holds per shard and where
//! a remote node sends a request, so the function must give the same answer on every machine,
//! in every build and in every later version. That rules out `ahash` and `std`'s `SipHash`
//! with random keys: both may change between versions or runs.
//!
//! The function is fixed as follows, and its test vectors below must never change:
//! 1. mix the key with the SplitMix64 finalizer (Steele, Lea, Flood 2014), so that sequential
//!    or structured ids spread evenly;
//! 2. map the mixed value to a shard with Jump Consistent Hash (Lamping and Veach 2014), so
//!    that growing from `n` to `n + 1` shards moves only `1/(n + 1)` of the keys.

use crate::ids::{FeatureId, ShardId};

/// The SplitMix64 finalizer: a fixed bijection on u64 with full avalanche.
#[inline]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Jump Consistent Hash: the bucket in `0..buckets` for a 64-bit key.
#[inline]
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(
        buckets > 0,
        "jump_consistent_hash needs at least one bucket"
    );
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The shard that owns `key` when there are `shard_count` shards.
///
/// # Panics
/// If `shard_count` is zero: a cluster always has at least one shard, and config validation
/// refuses zero before any key is routed.
#[inline]
pub fn shard_of(key: FeatureId, shard_count: u32) -> ShardId {
    jump_consistent_hash(mix64(key), shard_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values, computed by an independent Python implementation of the same algorithm. If this test fails, the shard function changed, and every persisted
    /// checkpoint and every mixed-version cluster would route keys to the wrong shard.
    #[test]
    fn shard_function_is_frozen() {
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        assert_eq!(mix64(0xdead_beef), 0x4e06_2702_ec92_9eea);
        let vectors: [(u64, u32, u32); 8] = [
            (0, 1, 0),
            (1, 4, 0),
            (42, 4, 0),
            (42, 8, 0),
            (0xdead_beef, 16, 8),
            (u64::MAX, 3, 0),
            (123_456_789, 1000, 776),
            (7, 2, 1),
        ];
        for (key, n, want) in vectors {
            assert_eq!(shard_of(key, n), want, "shard_of({key}, {n})");
        }
    }

    #[test]
    fn shards_are_balanced_and_growth_moves_few_keys() {
        let n = 8u32;
        let mut counts = vec![0u32; n as usize];
        let mut moved = 0u32;
        let keys = 80_000u64;
        for k in 0..keys {
            let s = shard_of(k, n);
            counts[s as usize] += 1;
            let s9 = shard_of(k, n + 1);
            if s9 != s {
                assert_eq!(s9, n, "growing only moves keys to the new shard");
                moved += 1;
            }
        }
        let expect = keys as f64 / f64::from(n);
        for c in counts {
            assert!(
                (f64::from(c) - expect).abs() < expect * 0.05,
                "unbalanced: {c}"
            );
        }
        let frac = f64::from(moved) / keys as f64;
        assert!((frac - 1.0 / 9.0).abs() < 0.01, "moved {frac}");
    }
}
