//! The change log: every row change stamps the row with the table's version, and a key is
//! logged at its first change after each seal, so `changes_since(v)` costs the changes since
//! the latest seal at or below `v`, never a scan of the table.

use super::*;

impl Table {
    /// Rows changed and keys deleted after version `since`. Costs in proportion to the
    /// changes since the latest seal at or below `since` (every earlier call is a seal), not
    /// to the size of the table.
    pub fn changes_since(&mut self, since: u64) -> Result<Changes, EmbeddingError> {
        if since < self.changes_floor {
            return Err(EmbeddingError::ChangesCompacted {
                table: self.name.clone(),
                since,
                floor: self.changes_floor,
            });
        }
        let seal = self.seals[self.seals.partition_point(|&s| s <= since) - 1];
        let start = self.changes.partition_point(|&(v, _)| v <= seal);
        let mut seen = ahash::AHashSet::new();
        let mut rows = Vec::new();
        let mut tombstones = Vec::new();
        for &(_, key) in &self.changes[start..] {
            if !seen.insert(key) {
                continue;
            }
            match self.index.find(key, index_hash(key)) {
                Some(pos) => {
                    let row = self.index.get(pos).row();
                    if self.meta.get(row)[0].version > since {
                        rows.push(row);
                    }
                }
                None => {
                    if self.tombstones.get(&key).is_some_and(|&d| d > since) {
                        tombstones.push(key);
                    }
                }
            }
        }
        let upserts = self.read_rows(&rows)?;
        if self.seals.last() != Some(&self.version) {
            self.seals.push(self.version);
        }
        Ok(Changes {
            since,
            version: self.version,
            upserts,
            tombstones,
        })
    }

    /// Everything that changed after version `since`, as a checkpoint delta: the rows and
    /// tombstones of [`Table::changes_since`] plus the table's small state.
    pub fn delta_since(&mut self, since: u64) -> Result<TableDelta, EmbeddingError> {
        let changes = self.changes_since(since)?;
        let mut free_rows = self.free_rows.clone();
        free_rows.retain(|&r| r < self.next_row);
        Ok(TableDelta {
            name: self.name.clone(),
            dim: self.dim as u32,
            optimizer: self.cfg.optimizer.name().to_owned(),
            row_floats: self.row_floats as u32,
            since,
            version: changes.version,
            upserts: changes.upserts,
            tombstones: changes.tombstones,
            next_row: self.next_row,
            free_rows,
            admission: self.admission.snapshot(),
            sampler: self.sampler.clone(),
            sweep_cursor: self.sweep_cursor,
            stats: self.stats.clone(),
        })
    }

    /// Forgets change history up to and including `version` (a checkpoint holds it now), so
    /// that tombstones do not accumulate. Later `changes_since(v)` needs `v >= version`.
    pub fn forget_changes_through(&mut self, version: u64) {
        let version = version.min(self.version);
        if version <= self.changes_floor {
            return;
        }
        // Entries up to the latest seal at or below `version` can go: a row changed after
        // that seal was logged again at its first change after it.
        let seal = self.seals[self.seals.partition_point(|&s| s <= version) - 1];
        self.tombstones.retain(|_, &mut v| v > version);
        let start = self.changes.partition_point(|&(v, _)| v <= seal);
        self.changes.drain(..start);
        self.seals.retain(|&s| s >= seal);
        self.changes_floor = version;
    }

    /// Drops superseded change entries once the log is twice what it needs to be, and the
    /// oldest tombstones beyond `max_tombstones` (raising the changes floor past them).
    pub(super) fn compact_changes(&mut self, max_tombstones: u64) {
        if self.tombstones.len() as u64 > max_tombstones {
            let mut versions: Vec<u64> = self.tombstones.values().copied().collect();
            let cut = versions.len() / 2;
            let (_, &mut nth, _) = versions.select_nth_unstable(cut);
            self.forget_changes_through(nth);
        }
        let needed = self.live_rows as usize + self.tombstones.len();
        if self.changes.len() > 2 * needed + 4096 {
            // Only a key's latest entry matters (it lies after every seal that an earlier one
            // served), and only for keys that still have a row or a tombstone.
            let mut seen = ahash::AHashSet::with_capacity(needed);
            let (index, tombstones) = (&self.index, &self.tombstones);
            let mut kept: Vec<(u64, u64)> = self
                .changes
                .iter()
                .rev()
                .filter(|&&(_, key)| {
                    seen.insert(key)
                        && (tombstones.contains_key(&key)
                            || index.find(key, index_hash(key)).is_some())
                })
                .copied()
                .collect();
            kept.reverse();
            self.changes = kept;
        }
    }
}
