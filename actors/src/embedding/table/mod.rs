//! One dynamic embedding table of one shard: the pure core behind a ShardOwner.
//!
//! Layout (see `docs/ARCHITECTURE.md` for the picture):
//! - `index`: open-addressing key → (row id, hot slot). Holds every row, hot or cold.
//! - `meta`: per row id, 32 bytes: key, version, last update/access step, update time, access
//!   count. Always in DRAM, so eviction decisions and change tracking never touch the disk.
//! - `rows`: the DRAM arena of hot slots, `stride` floats each: `[weights | optimizer state]`.
//! - `tier`: when a DRAM budget is set, cold rows live in a [`SpillStore`] instead of a slot.
//!
//! Every batched call resolves its keys in passes over the batch: hash and prefetch every
//! bucket, then probe and prefetch every row, then compute. The prefetches of one pass overlap
//! in the memory system, which is where the speed over a `HashMap` comes from.
//!
//! Decisions that change the model (admission, eviction) depend only on row ids, keys and the
//! table's seeded sampler, never on which tier a row is in, so a table with a tier computes
//! exactly what a table without one does.

use ahash::AHashMap;
use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

use super::admission::Admission;
use super::arena::Arena;
use super::config::{CapacityPolicy, TableConfig};
use super::index::{index_hash, Index, COLD};
use super::optimizer;
use super::snapshot::{RowBlock, RowSource, SliceRows, TableDelta, TableSnapshot};
use super::stats::TableStats;
use super::tier::SpillStore;
use super::{EmbeddingError, TrainCtx};
use crate::ids::TableName;
use crate::rng::{fnv1a, Xoshiro256};
use crate::routing::mix64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct RowMeta {
    key: u64,
    /// The table version of the row's last change; 0 marks a free row id.
    version: u64,
    /// Steps and seconds are stored as u32 and compared with wrapping arithmetic: ages up to
    /// 2^32 steps are exact, which keeps the record at 32 bytes, two to a cache line.
    update_step: u32,
    access_step: u32,
    update_secs: u32,
    freq: u32,
}

const META_BYTES: usize = std::mem::size_of::<RowMeta>();

/// What one `apply_gradients` call did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub applied: u64,
    /// Duplicate keys folded into their first occurrence.
    pub merged_duplicates: u64,
    pub rejected_non_finite: u64,
    pub without_row: u64,
}

/// Rows and tombstones changed after a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    pub since: u64,
    /// The table version the changes bring a copy up to.
    pub version: u64,
    pub upserts: RowBlock,
    pub tombstones: Vec<u64>,
}

/// How a batch resolves keys without a row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Plain lookup: a missing key reads as the default row and is never inserted.
    Read,
    /// Training lookup: a missing key goes through admission and may get a row.
    Admit,
    /// Gradients: a missing key is skipped.
    Existing,
}

const NO_SLOT: u32 = u32::MAX;

#[derive(Debug)]
struct Tier {
    store: SpillStore,
    hot_capacity: u32,
    /// Per row id: where its record lies while it is cold.
    disk_loc: Arena<u64>,
    /// Per hot slot: the row id living there.
    hot_owner: Vec<u32>,
    /// Per hot slot: 0 if not referenced since the clock hand passed, else the epoch (batch)
    /// that last touched it. A slot marked with the current epoch is pinned: the batch in
    /// progress holds it.
    hot_mark: Vec<u32>,
    epoch: u32,
    hand: u32,
    cold_rows: u64,
    /// Warned once when a batch needed more slots than the budget.
    overflow_warned: bool,
}

/// Scratch buffers reused across calls, so a batch allocates nothing.
#[derive(Debug, Default)]
struct Scratch {
    hashes: Vec<u64>,
    slots: Vec<u32>,
    rows: Vec<u32>,
    cold: Vec<(u64, u64, usize)>,
    row: Vec<f32>,
    dedup: Vec<(u64, u32)>,
    keys: Vec<u64>,
    grads: Vec<f32>,
    evict: Vec<u32>,
    /// `slots`/`rows` still describe these keys while the table's layout epoch is this one:
    /// the trainer's gradients for a batch come with the keys it just looked up, and
    /// resolving them again would repeat every random memory access of the lookup.
    resolved_keys: Vec<u64>,
    resolved_epoch: Option<u64>,
    /// The training lookup behind `resolved_keys` proved them free of duplicates, so the
    /// gradient push for the same keys can skip its duplicate check.
    resolved_unique: bool,
}

/// One dynamic embedding table.
#[derive(Debug)]
pub struct Table {
    name: TableName,
    cfg: TableConfig,
    dim: usize,
    /// Floats a row persists: weights and optimizer state.
    row_floats: usize,
    seed: u64,
    index: Index,
    meta: Arena<RowMeta>,
    rows: Arena<f32>,
    next_row: u32,
    free_rows: Vec<u32>,
    next_hot: u32,
    free_hot: Vec<u32>,
    live_rows: u64,
    version: u64,
    admission: Admission,
    /// (version, key), in version order: a key is logged on its first change after the latest
    /// seal, and on every deletion. A row changed a million times between two checkpoints
    /// costs one entry, and an update costs one comparison.
    changes: Vec<(u64, u64)>,
    /// Versions at which `changes_since` was asked (the log's seal points), ascending. A query
    /// scans from the latest seal at or below its version, so it costs the changes since then.
    seals: Vec<u64>,
    tombstones: AHashMap<u64, u64>,
    /// `changes_since(v)` for `v` below this needs a full snapshot instead.
    changes_floor: u64,
    sweep_cursor: u32,
    sampler: Xoshiro256,
    /// Bumped whenever a row gets, moves or loses a slot: creation, eviction, promotion,
    /// demotion. A resolution taken at an epoch is valid while the epoch holds.
    layout_epoch: u64,
    tier: Option<Tier>,
    /// The shard's spill directory this table was opened with (a restore opens a new store).
    spill_dir: Option<std::path::PathBuf>,
    stats: TableStats,
    scratch: Scratch,
}

/// Floats per hot slot: the fewest at which no slot straddles more cache lines than the row
/// needs when it starts a line. Arena chunks start on a line (2 MiB-aligned when mapped), so slot
/// `i` starts at byte `i * stride` of a line-aligned run, and the starts within a line are the
/// multiples of gcd(stride, 64). Padding every row to whole lines cost W&D's and DeepFM's rows (17 floats
/// and their Adagrad accumulators, 136 bytes) 192 bytes each; 136 bytes touch 3 lines wherever
/// they start on an 8-byte boundary, so they need no padding at all.
fn padded_stride(floats: usize) -> usize {
    let bytes = floats * 4;
    let lines = bytes.div_ceil(64);
    let mut stride = bytes.max(4);
    loop {
        let worst_start = 64 - gcd(stride, 64);
        if (worst_start + bytes).div_ceil(64) <= lines {
            return stride / 4;
        }
        stride += 4;
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Table {
    /// A new, empty table. `spill_dir` is required when `cfg.dram_budget_bytes` is set.
    pub fn new(
        name: TableName,
        cfg: TableConfig,
        spill_dir: Option<&std::path::Path>,
    ) -> Result<Self, EmbeddingError> {
        cfg.validate(&format!("embedding.tables.{name}"))
            .map_err(EmbeddingError::Config)?;
        let dim = cfg.dim;
        let row_floats = dim + cfg.optimizer.state_floats(dim);
        // A hot slot is `row_floats` padded so that no row straddles more lines than it must.
        let stride = padded_stride(row_floats);
        let seed = mix64(cfg.seed ^ fnv1a(name.as_str().as_bytes()));
        let tier = match (cfg.dram_budget_bytes, spill_dir) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(EmbeddingError::Config(super::InvalidValue::new(
                    format!("embedding.tables.{name}.dram_budget_bytes"),
                    cfg.dram_budget_bytes.unwrap_or(0),
                    "a spill directory (embedding.spill_dir) to go with a DRAM budget",
                )))
            }
            (Some(budget), Some(dir)) => {
                let per_slot = Self::hot_slot_bytes(&cfg) as u64;
                let hot_capacity = (budget / per_slot).clamp(1, u64::from(u32::MAX - 1)) as u32;
                let store =
                    SpillStore::open(&dir.join(name.as_str()), row_floats).map_err(|source| {
                        EmbeddingError::Tier {
                            table: name.clone(),
                            source,
                        }
                    })?;
                Some(Tier {
                    store,
                    hot_capacity,
                    disk_loc: Arena::new(1),
                    hot_owner: Vec::new(),
                    hot_mark: Vec::new(),
                    epoch: 1,
                    hand: 0,
                    cold_rows: 0,
                    overflow_warned: false,
                })
            }
        };
        Ok(Self {
            admission: Admission::new(&cfg.admission, seed),
            sampler: Xoshiro256::seed_from_u64(seed ^ 0xe71c7),
            name,
            dim,
            row_floats,
            seed,
            index: Index::with_capacity(0),
            meta: Arena::new(1),
            rows: Arena::new(stride),
            next_row: 0,
            free_rows: Vec::new(),
            next_hot: 0,
            free_hot: Vec::new(),
            live_rows: 0,
            version: 0,
            changes: Vec::new(),
            seals: vec![0],
            tombstones: AHashMap::new(),
            changes_floor: 0,
            sweep_cursor: 0,
            layout_epoch: 0,
            tier,
            spill_dir: spill_dir.map(std::path::Path::to_owned),
            stats: TableStats::default(),
            scratch: Scratch::default(),
            cfg,
        })
        .map(|mut table| {
            table.reserve();
            table
        })
    }

    /// Makes room for `reserve_rows` rows (see [`TableConfig::reserve_rows`]): index, metadata
    /// and, up to the DRAM budget, hot slots, all faulted in now.
    fn reserve(&mut self) {
        let rows = self.cfg.reserve_rows as usize;
        if rows == 0 {
            return;
        }
        let start = std::time::Instant::now();
        let hot = match &self.tier {
            Some(t) => rows.min(t.hot_capacity as usize),
            None => rows,
        };
        self.index = Index::with_capacity(rows);
        self.meta.ensure(rows);
        self.rows.ensure(hot);
        let bytes = self.index.prefault() + self.meta.prefault() + self.rows.prefault();
        tracing::debug!(table = %self.name, rows, mib = bytes >> 20,
            secs = start.elapsed().as_secs_f64(), "reserved and faulted in");
    }

    /// DRAM bytes per hot row, as a DRAM budget counts them: the padded row, and with a tier
    /// its owner id and clock mark.
    pub fn hot_slot_bytes(cfg: &TableConfig) -> usize {
        padded_stride(cfg.dim + cfg.optimizer.state_floats(cfg.dim)) * 4 + 8
    }

    pub fn name(&self) -> &TableName {
        &self.name
    }

    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Floats per row in snapshots and changes: weights then optimizer state.
    pub fn row_floats(&self) -> usize {
        self.row_floats
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> u64 {
        self.live_rows
    }

    pub fn is_empty(&self) -> bool {
        self.live_rows == 0
    }

    pub fn stats(&self) -> TableStats {
        let mut s = self.stats.clone();
        s.rows = self.live_rows;
        s.cold_rows = self.tier.as_ref().map_or(0, |t| t.cold_rows);
        s.hot_rows = self.live_rows - s.cold_rows;
        s.pending_admission = self.admission.pending_len() as u64;
        s.hot_bytes = (self.rows.bytes() + self.meta.bytes()) as u64;
        s.cold_bytes = self.tier.as_ref().map_or(0, |t| t.store.live_bytes());
        s.cold_file_bytes = self.tier.as_ref().map_or(0, |t| t.store.disk_bytes());
        s.index_bytes = self.index.bytes() as u64;
        s.admission_bytes = self.admission.bytes() as u64;
        s.version = self.version;
        s
    }

    /// Reads rows without inserting: a key without a row reads as the default row. Appends
    /// `keys.len() * dim` floats to `out`.
    pub fn lookup(&mut self, keys: &[u64], out: &mut Vec<f32>) -> Result<(), EmbeddingError> {
        let mut sc = std::mem::take(&mut self.scratch);
        let base = out.len();
        let r = self.resolve(keys, Mode::Read, &TrainCtx::default(), &mut sc, Some(out));
        if r.is_err() {
            // The batch's rows are copied out as they resolve: a failure part-way must not
            // leave the first ones behind.
            out.truncate(base);
        }
        self.scratch = sc;
        r.map(|_| ())
    }

    /// Reads rows for a training step: keys without a row go through admission, and every
    /// key's access is counted (for LFU/LRU and admission).
    pub fn lookup_for_training(
        &mut self,
        keys: &[u64],
        ctx: &TrainCtx,
        out: &mut Vec<f32>,
    ) -> Result<(), EmbeddingError> {
        let mut sc = std::mem::take(&mut self.scratch);
        let new_version = self.version + 1;
        let r = self
            .resolve(keys, Mode::Admit, ctx, &mut sc, None)
            .and_then(|created| {
                let step = ctx.step as u32;
                // Access counts and times are row state (LFU/LRU eviction reads them), so a
                // training lookup stamps the row like any change: a checkpoint delta must
                // carry them for a restore to be bit-identical.
                //
                // The stamps and the copy are whole-batch passes after the resolution, not a
                // stage of its pipeline: that way the batch's metadata and weights are the
                // lines most recently used when its gradients come. Stamping and copying
                // inside the pipeline made the gradient half slower and the training lookup
                // no faster (`docs/design-notes.md`).
                let seal = *self.seals.last().expect("seals start with one");
                let mut touched = created;
                // Every row's version is at most the table's, so a row already at
                // `new_version` was stamped earlier in this pass: its key occurs twice. Rows
                // created by this batch start at `new_version` too, and keys without a row
                // are not stamped at all, so either leaves the question open.
                let mut maybe_dup = created;
                for &row in &sc.rows {
                    if row == NO_SLOT {
                        maybe_dup = true;
                    } else {
                        let m = &mut self.meta.get_mut(row)[0];
                        maybe_dup |= m.version == new_version;
                        m.freq = m.freq.saturating_add(1);
                        m.access_step = step;
                        if m.version <= seal {
                            self.changes.push((new_version, m.key));
                        }
                        m.version = new_version;
                        touched = true;
                    }
                }
                self.gather(&sc.slots, out);
                if touched {
                    self.version = new_version;
                }
                // The resolution is valid at the epoch it was taken in. `maintain` may evict
                // or move rows of this very batch (an idle row looked up now), which bumps the
                // epoch, so `apply_gradients` must then resolve again instead of writing to a
                // row id that was freed and possibly handed to another key.
                let epoch = self.layout_epoch;
                self.maintain(ctx, true).map(|()| (epoch, !maybe_dup))
            });
        let r = r.map(|(epoch, unique)| {
            sc.resolved_keys.clear();
            sc.resolved_keys.extend_from_slice(keys);
            sc.resolved_epoch = Some(epoch);
            sc.resolved_unique = unique;
        });
        self.scratch = sc;
        r
    }

    /// Applies one gradient per key (`grads` holds `keys.len() * dim` floats). Gradients for
    /// the same key are summed first. A non-finite gradient, or one whose update would make the
    /// row non-finite, is refused and counted; the row is left exactly as it was.
    pub fn apply_gradients(
        &mut self,
        keys: &[u64],
        grads: &[f32],
        ctx: &TrainCtx,
    ) -> Result<ApplyReport, EmbeddingError> {
        if grads.len() != keys.len() * self.dim {
            return Err(EmbeddingError::GradientShape {
                table: self.name.clone(),
                keys: keys.len(),
                dim: self.dim,
                got: grads.len(),
            });
        }
        let mut sc = std::mem::take(&mut self.scratch);
        let r = self.apply_inner(keys, grads, ctx, &mut sc);
        self.scratch = sc;
        r
    }

    fn apply_inner(
        &mut self,
        keys: &[u64],
        grads: &[f32],
        ctx: &TrainCtx,
        sc: &mut Scratch,
    ) -> Result<ApplyReport, EmbeddingError> {
        let mut report = ApplyReport::default();
        let dim = self.dim;
        let resolved =
            sc.resolved_epoch == Some(self.layout_epoch) && sc.resolved_keys.as_slice() == keys;
        // Fold duplicates. The trainer already sends unique keys, and when its training lookup
        // of these very keys proved that, there is nothing to check; otherwise the common case
        // is one pass over a set that finds none.
        let merged = !(resolved && sc.resolved_unique) && dedup(keys, grads, dim, sc);
        if merged {
            report.merged_duplicates = (keys.len() - sc.keys.len()) as u64;
        }
        let (merged_keys, merged_grads): (Vec<u64>, Vec<f32>) = if merged {
            (std::mem::take(&mut sc.keys), std::mem::take(&mut sc.grads))
        } else {
            (Vec::new(), Vec::new())
        };
        let (keys_ref, grads_ref): (&[u64], &[f32]) = if merged {
            (&merged_keys, &merged_grads)
        } else {
            (keys, grads)
        };
        if merged || !resolved {
            self.resolve(keys_ref, Mode::Existing, ctx, sc, None)?;
        }
        let v = self.version + 1;
        let step = ctx.step as u32;
        let secs = ctx.now_secs();
        let rf = self.row_floats;
        sc.row.resize(rf, 0.0);
        let mut changed = false;
        for (i, (&key, &slot)) in keys_ref.iter().zip(&sc.slots).enumerate() {
            // The training lookup's lines have mostly left the cache by now (in training the
            // dense step ran in between, and a 4,096-key batch's buckets, rows, metadata and
            // outputs come to about as much as L2 holds), so each row and metadata line is a
            // memory access: start them a few keys ahead so that they overlap.
            if let Some(&ahead) = sc.slots.get(i + APPLY_AHEAD) {
                if ahead != NO_SLOT {
                    self.rows.prefetch(ahead, rf * 4);
                    self.meta.prefetch(sc.rows[i + APPLY_AHEAD], META_BYTES);
                }
            }
            if slot == NO_SLOT {
                report.without_row += 1;
                continue;
            }
            let g = &grads_ref[i * dim..(i + 1) * dim];
            if !all_finite(g) {
                report.rejected_non_finite += 1;
                continue;
            }
            // Update a copy and commit it only if it stayed finite: a huge gradient can
            // overflow an accumulator even when the gradient itself is finite.
            let row = &mut self.rows.get_mut(slot)[..rf];
            sc.row.copy_from_slice(row);
            optimizer::apply(&mut sc.row, dim, g, &self.cfg.optimizer);
            if !all_finite(&sc.row) {
                report.rejected_non_finite += 1;
                continue;
            }
            row.copy_from_slice(&sc.row);
            let m = &mut self.meta.get_mut(sc.rows[i])[0];
            if m.version <= *self.seals.last().expect("seals start with one") {
                self.changes.push((v, key));
            }
            m.version = v;
            m.update_step = step;
            m.update_secs = secs;
            changed = true;
            report.applied += 1;
            if let Some(floor) = self.cfg.eviction.min_l2_norm {
                let norm2: f32 = sc.row[..dim].iter().map(|x| x * x).sum();
                if norm2 < floor * floor {
                    sc.evict.push(sc.rows[i]);
                }
            }
        }
        if merged {
            sc.keys = merged_keys;
            sc.grads = merged_grads;
        }
        self.stats.rejected_gradients += report.rejected_non_finite;
        self.stats.gradients_without_row += report.without_row;
        if changed {
            self.version = v;
        }
        let l2: Vec<u32> = std::mem::take(&mut sc.evict);
        for &row in &l2 {
            // A row can be listed once per call (keys are unique here), so it is still live.
            self.evict_row(row, v)?;
            self.stats.evicted_l2 += 1;
        }
        sc.evict = l2;
        sc.evict.clear();
        self.maintain(ctx, false)?;
        Ok(report)
    }

    /// Deletes rows; returns how many existed. Each deletion leaves a tombstone.
    pub fn delete(&mut self, keys: &[u64]) -> Result<u64, EmbeddingError> {
        let v = self.version + 1;
        let mut n = 0;
        for &key in keys {
            if let Some(pos) = self.index.find(key, index_hash(key)) {
                let row = self.index.get(pos).row();
                self.evict_row(row, v)?;
                n += 1;
            }
        }
        if n > 0 {
            self.version = v;
            self.stats.deleted += n;
        }
        Ok(n)
    }
}

mod changes;
mod eviction;
mod resolve;
mod restore;
mod tiering;

#[cfg(test)]
mod tests;

/// Keys the gradient loop prefetches ahead of the one it updates: enough to keep a dozen
/// lines in flight; longer distances gain nothing (`freshet bench embedding`).
const APPLY_AHEAD: usize = 8;

/// Whether every value is finite: a branch-free fold over the exponent bits, which the
/// compiler vectorises (the short-circuiting `all(is_finite)` does not).
#[inline]
fn all_finite(xs: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    xs.iter()
        .fold(0u32, |bad, x| bad | u32::from(x.to_bits() & EXP == EXP))
        == 0
}

/// Folds duplicate keys: returns false when there are none (the common case, nothing copied),
/// else fills `sc.keys`/`sc.grads` with unique keys and summed gradients in first-seen order.
fn dedup(keys: &[u64], grads: &[f32], dim: usize, sc: &mut Scratch) -> bool {
    let cap = (keys.len() * 2).next_power_of_two().max(16);
    let mask = cap - 1;
    sc.dedup.clear();
    sc.dedup.resize(cap, (0, 0));
    let mut dup = false;
    for (i, &k) in keys.iter().enumerate() {
        let mut p = (mix64(k) as usize) & mask;
        loop {
            let (sk, si) = sc.dedup[p];
            if si == 0 {
                sc.dedup[p] = (k, i as u32 + 1);
                break;
            }
            if sk == k {
                dup = true;
                break;
            }
            p = (p + 1) & mask;
        }
        if dup {
            break;
        }
    }
    if !dup {
        return false;
    }
    // Slow path: map each key to its unique index, summing gradients.
    let mut first: AHashMap<u64, usize> = AHashMap::with_capacity(keys.len());
    sc.keys.clear();
    sc.grads.clear();
    for (i, &k) in keys.iter().enumerate() {
        let g = &grads[i * dim..(i + 1) * dim];
        match first.get(&k) {
            Some(&u) => {
                for (a, b) in sc.grads[u * dim..(u + 1) * dim].iter_mut().zip(g) {
                    *a += b;
                }
            }
            None => {
                first.insert(k, sc.keys.len());
                sc.keys.push(k);
                sc.grads.extend_from_slice(g);
            }
        }
    }
    true
}
