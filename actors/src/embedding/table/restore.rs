//! Snapshots and restore: whole rows with their metadata, pending admission state and the
//! sampler, so a restored table continues exactly as the original would.

use super::*;

/// Rows a restore takes from its source at once: 256 KiB of floats at dim 16 with Adagrad,
/// small enough to stay in L2 between the read that fills it and the copies out of it.
const RESTORE_BLOCK_ROWS: usize = 2048;

impl Table {
    /// Reads whole rows (weights, state and metadata) by row id, without promoting.
    pub(super) fn read_rows(&mut self, rows: &[u32]) -> Result<RowBlock, EmbeddingError> {
        let rf = self.row_floats;
        let mut block = RowBlock::with_capacity(rows.len(), rf);
        let mut cold = Vec::new();
        for (i, &row) in rows.iter().enumerate() {
            let m = self.meta.get(row)[0];
            let pos = self
                .index
                .find(m.key, index_hash(m.key))
                .expect("a live row is in the index");
            let hot = self.index.get(pos).hot;
            block.push_meta(
                row,
                m.key,
                m.version,
                m.update_step,
                m.access_step,
                m.update_secs,
                m.freq,
            );
            if hot == COLD {
                let at = self.tier.as_ref().expect("tier").disk_loc.get(row)[0];
                cold.push((at, m.key, i));
                block.data.extend(std::iter::repeat_n(0.0, rf));
            } else {
                block.data.extend_from_slice(&self.rows.get(hot)[..rf]);
            }
        }
        if !cold.is_empty() {
            let tier = self.tier.as_mut().expect("tier");
            let data = &mut block.data;
            let r = tier.store.read_many(&mut cold, |i, payload| {
                data[i * rf..(i + 1) * rf].copy_from_slice(payload);
            });
            r.map_err(|e| self.tier_err(e))?;
        }
        Ok(block)
    }

    /// The whole table: rows with their optimizer state and metadata, row-id allocation,
    /// pending admission state, the sampler and the counters.
    pub fn snapshot(&mut self) -> Result<TableSnapshot, EmbeddingError> {
        let live: Vec<u32> = (0..self.next_row)
            .filter(|&r| self.meta.get(r)[0].version != 0)
            .collect();
        let rows = self.read_rows(&live)?;
        let mut free_rows = self.free_rows.clone();
        free_rows.retain(|&r| r < self.next_row);
        Ok(TableSnapshot {
            name: self.name.clone(),
            dim: self.dim as u32,
            optimizer: self.cfg.optimizer.name().to_owned(),
            row_floats: self.row_floats as u32,
            version: self.version,
            next_row: self.next_row,
            free_rows,
            rows,
            admission: self.admission.snapshot(),
            sampler: self.sampler.clone(),
            sweep_cursor: self.sweep_cursor,
            stats: self.stats.clone(),
        })
    }

    /// Replaces this table's contents with a snapshot. Row ids are kept, so sampling and
    /// sweeping continue exactly as they would have without the restart.
    pub fn restore(&mut self, mut snap: TableSnapshot) -> Result<(), EmbeddingError> {
        let data = std::mem::take(&mut snap.rows.data);
        let need = snap.rows.len() * snap.row_floats as usize;
        if data.len() != need {
            return Err(EmbeddingError::SnapshotMismatch {
                table: self.name.clone(),
                reason: format!("row block has {} floats, its rows need {need}", data.len()),
            });
        }
        self.restore_from(snap, &mut SliceRows::new(&data))
    }

    /// [`Table::restore`] from `header` (a snapshot whose float block is empty), the rows'
    /// floats taken from `src` in the header's row order. Does not call `src.finish()`: a
    /// source may hold more tables, and its caller asks once all have been read.
    pub(crate) fn restore_from(
        &mut self,
        snap: TableSnapshot,
        src: &mut dyn RowSource,
    ) -> Result<(), EmbeddingError> {
        let mismatch = |reason: String| EmbeddingError::SnapshotMismatch {
            table: self.name.clone(),
            reason,
        };
        if snap.dim as usize != self.dim
            || snap.row_floats as usize != self.row_floats
            || snap.optimizer != self.cfg.optimizer.name()
        {
            return Err(mismatch(format!(
                "snapshot has dim {} with {} ({} floats per row), table has dim {} with {} ({})",
                snap.dim,
                snap.optimizer,
                snap.row_floats,
                self.dim,
                self.cfg.optimizer.name(),
                self.row_floats
            )));
        }
        snap.rows
            .check_columns()
            .map_err(|e| mismatch(e.to_string()))?;
        let mut fresh = Table::new(
            self.name.clone(),
            self.cfg.clone(),
            self.spill_dir.as_deref(),
        )?;
        fresh
            .admission
            .restore(snap.admission)
            .map_err(|e| mismatch(e.to_string()))?;
        fresh.index.reserve(snap.rows.len());
        fresh.next_row = snap.next_row;
        fresh.meta.ensure(snap.next_row as usize);
        let rf = self.row_floats;
        // Rows come in row-id order, so the arenas fill sequentially; the index is the one
        // random access per row, so its buckets are fetched a few rows ahead.
        const AHEAD: usize = 16;
        for &k in snap.rows.keys.iter().take(AHEAD) {
            fresh.index.prefetch(index_hash(k));
        }
        let n = snap.rows.len();
        let mut i = 0;
        while i < n {
            // The source hands rows over a block at a time: from a file, one read into a
            // buffer small enough to stay in cache while its rows are copied out.
            let take = RESTORE_BLOCK_ROWS.min(n - i);
            let block = src
                .next_floats(take * rf)
                .map_err(|e| mismatch(e.to_string()))?;
            if block.len() != take * rf || !all_finite(block) {
                return Err(mismatch(format!(
                    "rows {i}..{} hold a non-finite value or are short",
                    i + take
                )));
            }
            for (j, floats) in block.chunks_exact(rf).enumerate() {
                let i = i + j;
                if let Some(&k) = snap.rows.keys.get(i + AHEAD) {
                    fresh.index.prefetch(index_hash(k));
                }
                let row = snap.rows.row_ids[i];
                let key = snap.rows.keys[i];
                if row >= snap.next_row {
                    return Err(mismatch(format!(
                        "row id {row} beyond next_row {}",
                        snap.next_row
                    )));
                }
                if fresh.index.find(key, index_hash(key)).is_some() {
                    return Err(mismatch(format!("key {key:#x} appears twice")));
                }
                if fresh.meta.get(row)[0].version != 0 {
                    return Err(mismatch(format!("row id {row} appears twice")));
                }
                fresh.meta.get_mut(row)[0] = RowMeta {
                    key,
                    version: snap.rows.versions[i],
                    update_step: snap.rows.update_steps[i],
                    access_step: snap.rows.access_steps[i],
                    update_secs: snap.rows.update_secs[i],
                    freq: snap.rows.freqs[i],
                };
                let slot = fresh.alloc_hot(row)?;
                fresh.rows.get_mut(slot)[..rf].copy_from_slice(floats);
                fresh.index.insert_new(key, index_hash(key), row, slot);
                // Without a batch in progress, restored rows must be fair game for demotion.
                if let Some(t) = &mut fresh.tier {
                    t.hot_mark[slot as usize] = 0;
                }
            }
            i += take;
        }
        // Free row ids must be exactly the ids below next_row that hold no row: one listed
        // twice, or a live one listed as free, would later give two keys the same row id.
        let mut used = vec![false; snap.next_row as usize];
        for &r in &snap.rows.row_ids {
            used[r as usize] = true;
        }
        for &r in &snap.free_rows {
            match used.get_mut(r as usize) {
                Some(u) if !*u => *u = true,
                _ => {
                    return Err(mismatch(format!(
                        "free row id {r} is live, repeated or beyond next_row {}",
                        snap.next_row
                    )))
                }
            }
        }
        if let Some(r) = used.iter().position(|u| !u) {
            return Err(mismatch(format!("row id {r} is neither live nor free")));
        }
        fresh.live_rows = snap.rows.len() as u64;
        fresh.free_rows = snap.free_rows;
        fresh.version = snap.version;
        fresh.changes_floor = snap.version;
        fresh.seals = vec![snap.version];
        fresh.sampler = snap.sampler;
        fresh.sweep_cursor = snap.sweep_cursor.min(snap.next_row.saturating_sub(1));
        fresh.stats = snap.stats;
        *self = fresh;
        Ok(())
    }

    /// Every row's key, sorted (tests and tools; O(rows)).
    pub fn keys(&self) -> Vec<u64> {
        let mut k: Vec<u64> = self.index.iter().map(|b| b.key).collect();
        k.sort_unstable();
        k
    }
}
