//! Feature admission: whether a key that has no row yet gets one.
//!
//! Most ids in CTR data are seen once or twice; giving each a row wastes memory and trains noise.
//! A key that is not admitted reads as the table's default row and receives no updates. Pending
//! state (counts, filter counters, the sampler's stream) is part of the table's snapshot, so a
//! restore keeps every key as close to admission as it was.

use ahash::AHashMap;
use serde::{Deserialize, Serialize};

use super::config::AdmissionConfig;
use super::SnapshotError;
use crate::rng::Xoshiro256;
use crate::routing::mix64;

#[derive(Debug)]
pub(crate) enum Admission {
    None,
    Counter {
        min_count: u32,
        /// Occurrences so far of keys not yet admitted. ahash is fine here: nothing about this
        /// map's order is persisted (snapshots sort it).
        pending: AHashMap<u64, u32>,
    },
    CountingBloom {
        min_count: u32,
        hashes: u32,
        counters: Vec<u8>,
    },
    Probability {
        p: f64,
        rng: Xoshiro256,
    },
}

/// The persisted form of the pending state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AdmissionSnapshot {
    None,
    /// Sorted by key, so equal states serialize to equal bytes.
    Counter(Vec<(u64, u32)>),
    CountingBloom(Vec<u8>),
    Probability(Xoshiro256),
}

impl Admission {
    pub(crate) fn new(cfg: &AdmissionConfig, seed: u64) -> Self {
        match *cfg {
            AdmissionConfig::None => Self::None,
            AdmissionConfig::Counter { min_count } => Self::Counter {
                min_count,
                pending: AHashMap::new(),
            },
            AdmissionConfig::CountingBloom {
                min_count,
                false_positive_rate,
                expected_keys,
            } => {
                // The standard Bloom sizing: m = -n ln p / ln² 2, k = (m / n) ln 2.
                let n = expected_keys as f64;
                let ln2 = std::f64::consts::LN_2;
                let m = (-n * false_positive_rate.ln() / (ln2 * ln2))
                    .ceil()
                    .max(64.0);
                let k = ((m / n) * ln2).round().clamp(1.0, 16.0);
                Self::CountingBloom {
                    min_count,
                    hashes: k as u32,
                    counters: vec![0; m as usize],
                }
            }
            AdmissionConfig::Probability { p } => Self::Probability {
                p,
                rng: Xoshiro256::seed_from_u64(mix64(seed ^ 0xad01_5510)),
            },
        }
    }

    /// Records one occurrence of a key without a row; true if the key is admitted now.
    pub(crate) fn observe(&mut self, key: u64) -> bool {
        match self {
            Self::None => true,
            Self::Counter { min_count, pending } => {
                if *min_count <= 1 {
                    return true;
                }
                let c = pending.entry(key).or_insert(0);
                *c += 1;
                if *c >= *min_count {
                    pending.remove(&key);
                    true
                } else {
                    false
                }
            }
            Self::CountingBloom {
                min_count,
                hashes,
                counters,
            } => {
                // Double hashing (Kirsch and Mitzenmacher): k indexes from two halves of one
                // fixed 64-bit mix, so the filter's layout is stable across versions.
                let h = mix64(key ^ 0x5bd1_e995_bf58_476d);
                let (h1, h2) = (h as u32 as u64, (h >> 32) | 1);
                let m = counters.len() as u64;
                let idx = |i: u64| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize;
                let min = (0..u64::from(*hashes))
                    .map(|i| counters[idx(i)])
                    .min()
                    .unwrap_or(0);
                // Conservative update: raise only the counters at the minimum. It keeps the
                // overestimate (and so early admission) as small as a counting filter allows.
                let new = min.saturating_add(1);
                for i in 0..u64::from(*hashes) {
                    let c = &mut counters[idx(i)];
                    if *c < new {
                        *c = new;
                    }
                }
                u32::from(new) >= *min_count
            }
            Self::Probability { p, rng } => rng.next_f64() < *p,
        }
    }

    /// Keys (or filter cells) held while waiting for admission.
    pub(crate) fn pending_len(&self) -> usize {
        match self {
            Self::Counter { pending, .. } => pending.len(),
            Self::CountingBloom { counters, .. } => counters.iter().filter(|&&c| c > 0).count(),
            Self::None | Self::Probability { .. } => 0,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Counter { pending, .. } => pending.capacity() * 16,
            Self::CountingBloom { counters, .. } => counters.len(),
            Self::None | Self::Probability { .. } => 0,
        }
    }

    pub(crate) fn snapshot(&self) -> AdmissionSnapshot {
        match self {
            Self::None => AdmissionSnapshot::None,
            Self::Counter { pending, .. } => {
                let mut v: Vec<(u64, u32)> = pending.iter().map(|(&k, &c)| (k, c)).collect();
                v.sort_unstable();
                AdmissionSnapshot::Counter(v)
            }
            Self::CountingBloom { counters, .. } => {
                AdmissionSnapshot::CountingBloom(counters.clone())
            }
            Self::Probability { rng, .. } => AdmissionSnapshot::Probability(rng.clone()),
        }
    }

    /// Restores pending state; refuses a snapshot taken under a different policy.
    pub(crate) fn restore(&mut self, snap: AdmissionSnapshot) -> Result<(), SnapshotError> {
        match (self, snap) {
            (Self::None, AdmissionSnapshot::None) => Ok(()),
            (Self::Counter { pending, .. }, AdmissionSnapshot::Counter(v)) => {
                *pending = v.into_iter().collect();
                Ok(())
            }
            (Self::CountingBloom { counters, .. }, AdmissionSnapshot::CountingBloom(c)) => {
                if c.len() != counters.len() {
                    return Err(SnapshotError::Mismatch(format!(
                        "counting bloom filter has {} counters, snapshot has {}",
                        counters.len(),
                        c.len()
                    )));
                }
                *counters = c;
                Ok(())
            }
            (Self::Probability { rng, .. }, AdmissionSnapshot::Probability(r)) => {
                *rng = r;
                Ok(())
            }
            (me, snap) => Err(SnapshotError::Mismatch(format!(
                "admission policy {} cannot restore a {} snapshot",
                me.name(),
                match snap {
                    AdmissionSnapshot::None => "none",
                    AdmissionSnapshot::Counter(_) => "counter",
                    AdmissionSnapshot::CountingBloom(_) => "counting_bloom",
                    AdmissionSnapshot::Probability(_) => "probability",
                }
            ))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Counter { .. } => "counter",
            Self::CountingBloom { .. } => "counting_bloom",
            Self::Probability { .. } => "probability",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn counter_admits_exactly_on_the_nth_occurrence() {
        let seed = crate::testkit::seed("counter_admission");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let n = 1 + rng.below(5) as u32;
        let mut a = Admission::new(&AdmissionConfig::Counter { min_count: n }, seed);
        let mut seen: HashMap<u64, u32> = HashMap::new();
        let mut admitted: HashMap<u64, bool> = HashMap::new();
        for _ in 0..20_000 {
            let key = rng.below(500);
            if admitted.get(&key).copied().unwrap_or(false) {
                continue; // the table stops asking once a row exists
            }
            let c = seen.entry(key).or_default();
            *c += 1;
            let got = a.observe(key);
            assert_eq!(got, *c >= n, "seed {seed} key {key} count {c} n {n}");
            admitted.insert(key, got);
        }
        // Nothing admitted is still pending.
        assert_eq!(a.pending_len(), admitted.values().filter(|&&x| !x).count());
    }

    #[test]
    fn counting_bloom_never_admits_late_and_rarely_early() {
        let seed = crate::testkit::seed("bloom_admission");
        let cfg = AdmissionConfig::CountingBloom {
            min_count: 3,
            false_positive_rate: 0.01,
            expected_keys: 10_000,
        };
        let mut a = Admission::new(&cfg, seed);
        let mut early = 0;
        for key in 0..10_000u64 {
            let k = crate::routing::mix64(key ^ seed);
            let first = a.observe(k);
            let second = a.observe(k);
            let third = a.observe(k);
            assert!(third, "a key seen min_count times is always admitted");
            if first || second {
                early += 1;
            }
        }
        assert!(early < 300, "{early} of 10000 keys admitted early");
    }

    #[test]
    fn probability_admission_rate_and_restore() {
        let mut a = Admission::new(&AdmissionConfig::Probability { p: 0.25 }, 3);
        let hits = (0..40_000u64).filter(|&k| a.observe(k)).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
        let snap = a.snapshot();
        let next: Vec<bool> = (0..100u64).map(|k| a.observe(k)).collect();
        let mut b = Admission::new(&AdmissionConfig::Probability { p: 0.25 }, 3);
        b.restore(snap).unwrap();
        let again: Vec<bool> = (0..100u64).map(|k| b.observe(k)).collect();
        assert_eq!(next, again, "restored sampler continues the same stream");
        assert!(b.restore(AdmissionSnapshot::None).is_err());
    }
}
