//! Resolution: every batched call maps its keys to hot slots here, through a software
//! pipeline of bucket prefetch, probe and row prefetch, then copy, and creates the rows that
//! admission lets in.

use super::*;

/// Keys between the stages of `resolve`'s pipeline: 8 keys keep about 24 lines in flight,
/// and more gain nothing.
const RESOLVE_AHEAD: usize = 8;

impl Table {
    /// Resolves every key to a hot slot (or `NO_SLOT`), promoting cold rows and, in `Admit`
    /// mode, creating admitted rows. Fills `sc.slots` and `sc.rows`. With `out` (a plain
    /// lookup), also appends each key's weights, the default row for a key without one.
    /// Returns whether a row was created (a model change). On error `out` may hold part of
    /// the batch; `lookup` cuts it back.
    ///
    /// The batch goes through a software pipeline: key `i + 2 * RESOLVE_AHEAD`'s bucket is
    /// prefetched, key `i + RESOLVE_AHEAD` is probed and its row (and, to train, its metadata)
    /// prefetched, and key `i`'s weights are copied out. Each line is used a few dozen keys
    /// after it was requested. Whole-batch passes (all buckets, then all rows, then the copy)
    /// are slower (`docs/design-notes.md` has the runs): a batch's lines lie on thousands of
    /// pages, so a line fetched a whole pass earlier has often lost its cache or TLB entry by
    /// the time a later pass comes back to it.
    pub(super) fn resolve(
        &mut self,
        keys: &[u64],
        mode: Mode,
        ctx: &TrainCtx,
        sc: &mut Scratch,
        mut out: Option<&mut Vec<f32>>,
    ) -> Result<bool, EmbeddingError> {
        let n = keys.len();
        let dim = self.dim;
        sc.resolved_epoch = None;
        if mode == Mode::Admit {
            // No growth mid-batch: bucket positions and prefetches stay valid to the end.
            self.index.reserve(n);
        }
        if let Some(t) = &mut self.tier {
            t.epoch = t.epoch.wrapping_add(1).max(1);
        }
        let base = out.as_ref().map_or(0, |o| o.len());
        if let Some(o) = out.as_deref_mut() {
            o.reserve(n * dim);
        }
        sc.hashes.clear();
        sc.hashes.extend(keys.iter().map(|&k| index_hash(k)));
        sc.slots.clear();
        sc.rows.clear();
        sc.cold.clear();
        // A read needs only the weights; training will also update the optimizer state.
        let bytes = if mode == Mode::Read {
            dim * 4
        } else {
            self.row_floats * 4
        };
        let v = self.version + 1;
        let mut created = false;
        for i in 0..n + 2 * RESOLVE_AHEAD {
            // Stage 1: the bucket.
            if let Some(&h) = sc.hashes.get(i) {
                self.index.prefetch(h);
            }
            // Stage 2: probe; prefetch the row and, to train, its metadata.
            if let Some(j) = i.checked_sub(RESOLVE_AHEAD).filter(|&j| j < n) {
                let (key, h) = (keys[j], sc.hashes[j]);
                match self.index.find(key, h) {
                    Some(pos) => {
                        let b = *self.index.get(pos);
                        let row = b.row();
                        if mode != Mode::Read {
                            self.meta.prefetch(row, META_BYTES);
                        }
                        if b.hot == COLD {
                            let at = self.tier.as_ref().map_or(0, |t| t.disk_loc.get(row)[0]);
                            sc.cold.push((at, key, j));
                            self.stats.tier_misses += 1;
                        } else {
                            self.rows.prefetch(b.hot, bytes);
                            if let Some(t) = &mut self.tier {
                                t.hot_mark[b.hot as usize] = t.epoch;
                            }
                            self.stats.tier_hits += 1;
                        }
                        sc.slots.push(b.hot);
                        sc.rows.push(row);
                    }
                    None if mode == Mode::Admit && self.admission.observe(key) => {
                        let (row, slot) = self.create_row(key, h, v, ctx)?;
                        created = true;
                        sc.slots.push(slot);
                        sc.rows.push(row);
                    }
                    None => {
                        if mode == Mode::Admit {
                            self.stats.admission_rejected += 1;
                        }
                        sc.slots.push(NO_SLOT);
                        sc.rows.push(NO_SLOT);
                    }
                }
            }
            // Stage 3: copy the weights out. A cold row's are copied once it is promoted,
            // below; until then the default row holds its place.
            if let (Some(o), Some(j)) = (out.as_deref_mut(), i.checked_sub(2 * RESOLVE_AHEAD)) {
                match sc.slots[j] {
                    NO_SLOT => o.extend(std::iter::repeat_n(self.cfg.default_value, dim)),
                    slot => o.extend_from_slice(&self.rows.get(slot)[..dim]),
                }
            }
        }
        if created {
            // A key admitted by a later occurrence in this batch: its earlier occurrences must
            // read the same row, not the default. (A row id of `NO_SLOT` marks a key that had
            // no row; a cold row's slot is `COLD`, the same number as `NO_SLOT`.)
            for (i, &key) in keys.iter().enumerate() {
                if sc.rows[i] == NO_SLOT {
                    if let Some(pos) = self.index.find(key, sc.hashes[i]) {
                        let b = *self.index.get(pos);
                        sc.slots[i] = b.hot;
                        sc.rows[i] = b.row();
                    }
                }
            }
        }
        if !sc.cold.is_empty() {
            self.promote(sc)?;
            if let Some(o) = out {
                for &(_, _, i) in &sc.cold {
                    let at = base + i * dim;
                    o[at..at + dim].copy_from_slice(&self.rows.get(sc.slots[i])[..dim]);
                }
            }
        }
        Ok(created)
    }

    pub(super) fn create_row(
        &mut self,
        key: u64,
        hash: u64,
        version: u64,
        ctx: &TrainCtx,
    ) -> Result<(u32, u32), EmbeddingError> {
        let row = self.free_rows.pop().unwrap_or_else(|| {
            self.next_row += 1;
            self.next_row - 1
        });
        self.meta.ensure(row as usize + 1);
        let slot = self.alloc_hot(row)?;
        optimizer::init_row(
            &mut self.rows.get_mut(slot)[..self.row_floats],
            self.dim,
            &self.cfg.init,
            &self.cfg.optimizer,
            self.seed,
            key,
        );
        self.meta.get_mut(row)[0] = RowMeta {
            key,
            version,
            update_step: ctx.step as u32,
            access_step: ctx.step as u32,
            update_secs: ctx.now_secs(),
            freq: 0,
        };
        self.index.insert_new(key, hash, row, slot);
        self.layout_epoch += 1;
        self.tombstones.remove(&key);
        self.changes.push((version, key));
        self.live_rows += 1;
        self.stats.admitted += 1;
        Ok((row, slot))
    }

    pub(super) fn gather(&self, slots: &[u32], out: &mut Vec<f32>) {
        let dim = self.dim;
        out.reserve(slots.len() * dim);
        for &slot in slots {
            if slot == NO_SLOT {
                out.extend(std::iter::repeat_n(self.cfg.default_value, dim));
            } else {
                out.extend_from_slice(&self.rows.get(slot)[..dim]);
            }
        }
    }
}
