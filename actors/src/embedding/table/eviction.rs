//! Eviction by idle steps, idle time, capacity (LFU/LRU by a seeded sample) and norm: a
//! swept cursor visits row ids in order, so what is evicted depends on row ids alone, never
//! on which tier a row lives in.

use super::*;

impl Table {
    /// Removes a row: index entry, slot or disk record, row id; leaves a tombstone at `v`.
    pub(super) fn evict_row(&mut self, row: u32, v: u64) -> Result<(), EmbeddingError> {
        let key = self.meta.get(row)[0].key;
        let bucket = self
            .index
            .remove(key)
            .expect("a live row id is in the index");
        if bucket.hot == COLD {
            let tier = self
                .tier
                .as_mut()
                .expect("cold rows exist only with a tier");
            let at = tier.disk_loc.get(row)[0];
            tier.cold_rows -= 1;
            if let Err(e) = tier.store.free(at) {
                return Err(self.tier_err(e));
            }
        } else {
            self.free_hot.push(bucket.hot);
            if let Some(t) = &mut self.tier {
                // A free slot has no owner for the clock hand to demote.
                t.hot_owner[bucket.hot as usize] = NO_SLOT;
                t.hot_mark[bucket.hot as usize] = 0;
            }
        }
        self.meta.get_mut(row)[0].version = 0;
        self.layout_epoch += 1;
        self.free_rows.push(row);
        self.live_rows -= 1;
        self.tombstones.insert(key, v);
        self.changes.push((v, key));
        self.version = self.version.max(v);
        Ok(())
    }

    /// Amortised upkeep after a training call: a bounded slice of the idle sweep, capacity
    /// eviction, one tier compaction at most, and change-log compaction.
    ///
    /// `spare_current`: skip idle rows accessed in `ctx.step` (set after a training lookup,
    /// whose rows the caller is about to update).
    pub(super) fn maintain(
        &mut self,
        ctx: &TrainCtx,
        spare_current: bool,
    ) -> Result<(), EmbeddingError> {
        let v = self.version + 1;
        let ev = self.cfg.eviction.clone();
        let mut evicted_any = false;
        if (ev.max_idle_steps.is_some() || ev.max_idle_secs.is_some()) && self.next_row > 0 {
            let step = ctx.step as u32;
            let secs = ctx.now_secs();
            let n = ev.sweep_rows_per_call.min(self.next_row);
            for _ in 0..n {
                let row = self.sweep_cursor;
                self.sweep_cursor = (self.sweep_cursor + 1) % self.next_row;
                let m = self.meta.get(row)[0];
                // After a training lookup, the rows it just returned are about to be updated:
                // they are in use, however long they sat idle before.
                if m.version == 0 || (spare_current && m.access_step == step) {
                    continue;
                }
                let idle_steps = u64::from(step.wrapping_sub(m.update_step));
                let idle_secs = u64::from(secs.wrapping_sub(m.update_secs));
                if ev.max_idle_steps.is_some_and(|max| idle_steps > max) {
                    self.evict_row(row, v)?;
                    self.stats.evicted_idle_steps += 1;
                    evicted_any = true;
                } else if ev.max_idle_secs.is_some_and(|max| idle_secs > max) {
                    self.evict_row(row, v)?;
                    self.stats.evicted_idle_secs += 1;
                    evicted_any = true;
                }
            }
        }
        if let Some(cap) = ev.capacity {
            while self.live_rows > cap {
                let Some(row) = self.sample_victim(ev.capacity_policy, ev.sample_size, ctx) else {
                    break;
                };
                self.evict_row(row, v)?;
                self.stats.evicted_capacity += 1;
                evicted_any = true;
            }
        }
        if evicted_any {
            self.version = v;
        }
        self.compact_tier()?;
        self.compact_changes(ev.max_tombstones);
        Ok(())
    }

    /// Redis-style approximate LRU/LFU: the worst of `k` sampled live rows. Rows touched in
    /// the current step are spared, so a row looked up for this step keeps its gradient.
    pub(super) fn sample_victim(
        &mut self,
        policy: CapacityPolicy,
        k: u32,
        ctx: &TrainCtx,
    ) -> Option<u32> {
        let step = ctx.step as u32;
        let mut best: Option<(u64, u32)> = None;
        let mut tries = 0;
        let mut found = 0;
        while found < k && tries < 64 * k {
            tries += 1;
            let row = self.sampler.below(u64::from(self.next_row)) as u32;
            let m = self.meta.get(row)[0];
            if m.version == 0 || m.access_step == step {
                continue;
            }
            found += 1;
            // Lower score = better victim; the row id breaks ties deterministically.
            let score = match policy {
                CapacityPolicy::Lru => u64::MAX - u64::from(step.wrapping_sub(m.access_step)),
                CapacityPolicy::Lfu => u64::from(m.freq),
            };
            if best.is_none_or(|(s, r)| (score, row) < (s, r)) {
                best = Some((score, row));
            }
        }
        best.map(|(_, r)| r)
    }
}
