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

/// Keys between the stages of `resolve`'s pipeline: 8 keys keep about 24 lines in flight.
/// 16 measured the same.
const RESOLVE_AHEAD: usize = 8;

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

    fn tier_err(&self, source: std::io::Error) -> EmbeddingError {
        EmbeddingError::Tier {
            table: self.name.clone(),
            source,
        }
    }

    // ---------------------------------------------------------------- batched operations

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
                // lines most recently used when its gradients come. A build that stamped and
                // copied inside the pipeline measured its gradient half at 125-166 ns a key
                // against 107-121 ns this way (`freshet bench embedding`, interleaved), and
                // its training lookup no faster.
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

    // ---------------------------------------------------------------- resolution

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
    /// measured slower: plain lookups took 117-127 ns a key that way and 105-109 ns
    /// pipelined, training lookups 234-238 ns and 218-221 ns (three interleaved runs each of
    /// `freshet bench embedding --keys 10000000 --dim 16 --zipf 1.1 --batch 4096`). A batch's
    /// lines lie on thousands of pages, so a line fetched a whole pass earlier has often lost
    /// its cache or TLB entry by the time a later pass comes back to it.
    fn resolve(
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

    /// Brings every row in `sc.cold` into a hot slot, reading them in one sorted pass.
    fn promote(&mut self, sc: &mut Scratch) -> Result<(), EmbeddingError> {
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
    fn alloc_hot(&mut self, row: u32) -> Result<u32, EmbeddingError> {
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
    fn demote_one(&mut self) -> Result<Option<u32>, EmbeddingError> {
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

    fn create_row(
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

    fn gather(&self, slots: &[u32], out: &mut Vec<f32>) {
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

    // ---------------------------------------------------------------- eviction

    /// Removes a row: index entry, slot or disk record, row id; leaves a tombstone at `v`.
    fn evict_row(&mut self, row: u32, v: u64) -> Result<(), EmbeddingError> {
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
    fn maintain(&mut self, ctx: &TrainCtx, spare_current: bool) -> Result<(), EmbeddingError> {
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
    fn sample_victim(&mut self, policy: CapacityPolicy, k: u32, ctx: &TrainCtx) -> Option<u32> {
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

    fn compact_tier(&mut self) -> Result<(), EmbeddingError> {
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

    /// Drops superseded change entries once the log is twice what it needs to be, and the
    /// oldest tombstones beyond `max_tombstones` (raising the changes floor past them).
    fn compact_changes(&mut self, max_tombstones: u64) {
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

    // ---------------------------------------------------------------- snapshots

    /// Reads whole rows (weights, state and metadata) by row id, without promoting.
    fn read_rows(&mut self, rows: &[u32]) -> Result<RowBlock, EmbeddingError> {
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
        snap.rows.check_columns().map_err(&mismatch)?;
        let mut fresh = Table::new(
            self.name.clone(),
            self.cfg.clone(),
            self.spill_dir.as_deref(),
        )?;
        fresh.admission.restore(snap.admission).map_err(&mismatch)?;
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
            let block = src.next_floats(take * rf).map_err(&mismatch)?;
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

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;

/// Rows a restore takes from its source at once: 256 KiB of floats at dim 16 with Adagrad,
/// small enough to stay in L2 between the read that fills it and the copies out of it.
const RESTORE_BLOCK_ROWS: usize = 2048;

/// Keys the gradient loop prefetches ahead of the one it updates: enough to keep a dozen
/// lines in flight; 8 to 64 measured the same (`freshet bench embedding`).
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
