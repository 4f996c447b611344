//! The stable hash from a string feature value to a u64 feature id.
//!
//! ```text
//! id = splitmix64(fnv1a64(field_name + "=" + value))
//! fnv1a64:      h = 0xcbf29ce484222325; for each byte b: h = (h ^ b) * 0x100000001b3
//! splitmix64(x): z = x + 0x9e3779b97f4a7c15; then the SplitMix64 finalizer
//! ```
//! (all arithmetic mod 2^64). The field name salts the value, so "42" in `user_id` and "42" in
//! `item_id` are different ids and fields can share a table without colliding. The function
//! is the one the PyTorch peer (`benches/peer/peer.py`) uses, so both trainers see
//! the same ids for the same rows. Ids are persisted in checkpoints and sent between nodes,
//! so the golden vectors below must never change.

use crate::ids::FeatureId;
use crate::routing::mix64;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline]
fn fnv1a_extend(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    h
}

/// The FNV-1a state after `field + "="`: hashing many values of one field starts from here.
#[inline]
pub fn field_salt(field: &str) -> u64 {
    fnv1a_extend(fnv1a_extend(FNV_OFFSET, field.as_bytes()), b"=")
}

/// The id of `value` in the field whose [`field_salt`] is `salt`.
#[inline]
pub fn salted_id(salt: u64, value: &[u8]) -> FeatureId {
    mix64(fnv1a_extend(salt, value).wrapping_add(GOLDEN_GAMMA))
}

/// The id of the string `value` in field `field`.
pub fn feature_id(field: &str, value: &str) -> FeatureId {
    salted_id(field_salt(field), value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed by an independent Python implementation of the formula in the module docs
    /// (the same one `peer.py` uses). These must never change.
    #[test]
    fn golden_vectors() {
        assert_eq!(feature_id("C1", ""), 0x5a03_bcda_b7e9_5a37);
        assert_eq!(feature_id("C1", "68fd1e64"), 0xfdf9_1468_0a19_f3eb);
        assert_eq!(feature_id("C2", "68fd1e64"), 0xf083_6f91_9b2f_c532);
        assert_eq!(feature_id("C26", "0"), 0xdee5_1633_653e_ab27);
        assert_eq!(feature_id("user_id", "42"), 0xee70_b479_6e9f_d801);
    }

    #[test]
    fn salt_separates_fields() {
        assert_ne!(feature_id("a", "bc"), feature_id("ab", "c"));
    }
}
