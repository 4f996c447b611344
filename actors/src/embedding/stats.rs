//! A table's counters, its observable state: reported by the ShardOwner, carried in
//! snapshots, summed per shard.

use serde::{Deserialize, Serialize};

/// Counters, exported as the table's observable state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStats {
    pub rows: u64,
    pub hot_rows: u64,
    pub cold_rows: u64,
    /// Keys given a row (by admission or restore of a new key).
    pub admitted: u64,
    /// Training lookups of keys not (yet) admitted.
    pub admission_rejected: u64,
    pub pending_admission: u64,
    pub evicted_idle_steps: u64,
    pub evicted_idle_secs: u64,
    pub evicted_capacity: u64,
    pub evicted_l2: u64,
    pub deleted: u64,
    /// Gradients refused because they, or the update they would cause, were not finite.
    pub rejected_gradients: u64,
    /// Gradients for keys without a row (never admitted, or evicted since the lookup).
    pub gradients_without_row: u64,
    pub tier_hits: u64,
    pub tier_misses: u64,
    pub hot_bytes: u64,
    /// Bytes of live cold rows on disk.
    pub cold_bytes: u64,
    /// Bytes of spill files, including garbage awaiting compaction.
    pub cold_file_bytes: u64,
    pub index_bytes: u64,
    /// Bytes of pending admission state (counts or filter).
    pub admission_bytes: u64,
    pub version: u64,
}

impl TableStats {
    pub fn evicted(&self) -> u64 {
        self.evicted_idle_steps + self.evicted_idle_secs + self.evicted_capacity + self.evicted_l2
    }

    /// Share of row accesses served from DRAM (1.0 without a tier).
    pub fn tier_hit_rate(&self) -> f64 {
        let total = self.tier_hits + self.tier_misses;
        if total == 0 {
            1.0
        } else {
            self.tier_hits as f64 / total as f64
        }
    }
}
