//! The DRAM budget: hot slots are allocated here, cold rows are promoted from and demoted to
//! the [`SpillStore`], and the spill files are compacted.

use super::*;

impl Table {
    pub(super) fn tier_err(&self, source: std::io::Error) -> EmbeddingError {
        EmbeddingError::Tier {
            table: self.name.clone(),
            source,
        }
    }

    /// Brings every row in `sc.cold` into a hot slot, reading them in one sorted pass.
    pub(super) fn promote(&mut self, sc: &mut Scratch) -> Result<(), EmbeddingError> {
        let mut cold = std::mem::take(&mut sc.cold);
        let mut fetched: Vec<(usize, Vec<f32>)> = Vec::with_capacity(cold.len());
        let tier = self
            .tier
            .as_mut()
            .expect("cold rows exist only with a tier");
        let r = tier
            .store
            .read_many(&mut cold, |i, payload| fetched.push((i, payload.to_vec())));
        if let Err(e) = r {
            sc.cold = cold;
            return Err(self.tier_err(e));
        }
        for (i, payload) in fetched {
            let row = sc.rows[i];
            let key = self.meta.get(row)[0].key;
            let pos = self
                .index
                .find(key, index_hash(key))
                .expect("a cold row is in the index");
            let hot = self.index.get(pos).hot;
            if hot != COLD {
                // The key occurs twice in the batch and its first occurrence promoted it.
                sc.slots[i] = hot;
                continue;
            }
            let slot = self.alloc_hot(row)?;
            self.rows.get_mut(slot)[..self.row_floats].copy_from_slice(&payload);
            let tier = self.tier.as_mut().expect("tier");
            let at = tier.disk_loc.get(row)[0];
            tier.cold_rows -= 1;
            if let Err(e) = tier.store.free(at) {
                sc.cold = cold;
                return Err(self.tier_err(e));
            }
            self.index.get_mut(pos).hot = slot;
            self.layout_epoch += 1;
            sc.slots[i] = slot;
        }
        sc.cold = cold;
        Ok(())
    }

    /// A hot slot for `row`, demoting a cold-enough row when the DRAM budget is full.
    pub(super) fn alloc_hot(&mut self, row: u32) -> Result<u32, EmbeddingError> {
        let slot = if let Some(s) = self.free_hot.pop() {
            s
        } else if self
            .tier
            .as_ref()
            .is_none_or(|t| self.next_hot < t.hot_capacity)
        {
            self.next_hot += 1;
            self.next_hot - 1
        } else {
            match self.demote_one()? {
                Some(s) => s,
                None => {
                    // Every slot is pinned by the batch in progress: the batch is larger than
                    // the budget. Exceed the budget rather than fail the step.
                    let t = self.tier.as_mut().expect("tier");
                    if !t.overflow_warned {
                        t.overflow_warned = true;
                        tracing::warn!(table = %self.name, budget_rows = t.hot_capacity,
                            "a batch needs more rows than the DRAM budget holds; exceeding it");
                    }
                    t.hot_capacity += 1;
                    self.next_hot += 1;
                    self.next_hot - 1
                }
            }
        };
        self.rows.ensure(slot as usize + 1);
        if let Some(t) = &mut self.tier {
            let s = slot as usize;
            if t.hot_owner.len() <= s {
                t.hot_owner.resize(s + 1, 0);
                t.hot_mark.resize(s + 1, 0);
            }
            t.hot_owner[s] = row;
            t.hot_mark[s] = t.epoch;
        }
        Ok(slot)
    }

    /// CLOCK: moves one unpinned, unreferenced row to disk and returns its slot.
    pub(super) fn demote_one(&mut self) -> Result<Option<u32>, EmbeddingError> {
        let rf = self.row_floats;
        let tier = self.tier.as_mut().expect("demotion needs a tier");
        let n = self.next_hot;
        // Two sweeps: the first may only clear reference marks.
        for _ in 0..2 * n {
            let s = tier.hand;
            tier.hand = (tier.hand + 1) % n;
            let mark = tier.hot_mark[s as usize];
            if mark == tier.epoch || tier.hot_owner[s as usize] == NO_SLOT {
                continue; // pinned by this batch, or free
            }
            if mark != 0 {
                tier.hot_mark[s as usize] = 0;
                continue;
            }
            let row = tier.hot_owner[s as usize];
            let key = self.meta.get(row)[0].key;
            let at = match tier.store.append(key, &self.rows.get(s)[..rf]) {
                Ok(at) => at,
                Err(e) => return Err(self.tier_err(e)),
            };
            tier.disk_loc.ensure(row as usize + 1);
            tier.disk_loc.get_mut(row)[0] = at;
            tier.cold_rows += 1;
            let pos = self
                .index
                .find(key, index_hash(key))
                .expect("a hot row is in the index");
            self.index.get_mut(pos).hot = COLD;
            self.layout_epoch += 1;
            return Ok(Some(s));
        }
        Ok(None)
    }

    pub(super) fn compact_tier(&mut self) -> Result<(), EmbeddingError> {
        let Some(tier) = &mut self.tier else {
            return Ok(());
        };
        let Some(sid) = tier.store.compaction_candidate() else {
            return Ok(());
        };
        let records = match tier.store.records(sid) {
            Ok(r) => r,
            Err(e) => return Err(self.tier_err(e)),
        };
        for (at, key, payload) in records {
            let Some(pos) = self.index.find(key, index_hash(key)) else {
                continue;
            };
            let b = *self.index.get(pos);
            let tier = self.tier.as_mut().expect("tier");
            if b.hot != COLD || tier.disk_loc.get(b.row())[0] != at {
                continue; // a stale copy: the row moved since
            }
            let r = tier.store.append(key, &payload).and_then(|new_at| {
                tier.disk_loc.get_mut(b.row())[0] = new_at;
                tier.store.free(at)
            });
            if let Err(e) = r {
                return Err(self.tier_err(e));
            }
        }
        Ok(())
    }
}
