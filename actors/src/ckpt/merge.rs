//! Pure functions on snapshots: bringing a full version's shard snapshots forward through a
//! chain of deltas, and re-routing rows into a different number of shards.
//!
//! Restore works on snapshots rather than on live tables so that it is plain data in, data
//! out: the result is exactly what [`crate::embedding::Table::snapshot`] would have returned
//! at that version (rows in row-id order), which is what makes restore testable bit for bit.

use ahash::AHashMap;

use crate::embedding::{
    AdmissionSnapshot, RowBlock, ShardDelta, ShardSnapshot, SnapshotError, TableDelta,
    TableSnapshot, TableStats,
};
use crate::routing::shard_of;

/// Applies deltas to one table's snapshot, in order, each starting where the last ended.
struct TableMerge {
    snap: TableSnapshot,
    /// Key -> index into `snap.rows`, for rows still live.
    pos: AHashMap<u64, usize>,
    dead: Vec<bool>,
    changed: bool,
}

impl TableMerge {
    fn new(snap: TableSnapshot) -> Self {
        Self {
            snap,
            pos: AHashMap::new(),
            dead: Vec::new(),
            changed: false,
        }
    }

    fn apply(&mut self, d: TableDelta) -> Result<(), SnapshotError> {
        let s = &mut self.snap;
        if d.dim != s.dim || d.row_floats != s.row_floats || d.optimizer != s.optimizer {
            return Err(SnapshotError::Mismatch(format!(
                "delta of table {} has dim {} with {} ({} floats), the base has dim {} with {} ({})",
                d.name, d.dim, d.optimizer, d.row_floats, s.dim, s.optimizer, s.row_floats
            )));
        }
        if d.since != s.version {
            return Err(SnapshotError::Mismatch(format!(
                "delta of table {} starts at table version {}, the state it applies to is at {}",
                d.name, d.since, s.version
            )));
        }
        let rf = s.row_floats as usize;
        d.upserts
            .check(rf)
            .map_err(|e| SnapshotError::Malformed(format!("delta of table {}: {e}", d.name)))?;
        if !self.changed {
            // The base came from disk: its columns must agree before rows are indexed by them.
            s.rows.check(rf).map_err(|e| {
                SnapshotError::Malformed(format!("table {} of the base: {e}", s.name))
            })?;
            // Built on first use: a restore without deltas never pays for the map.
            self.pos.reserve(s.rows.len());
            for (i, &k) in s.rows.keys.iter().enumerate() {
                self.pos.insert(k, i);
            }
            self.dead = vec![false; s.rows.len()];
            self.changed = true;
        }
        for k in &d.tombstones {
            if let Some(i) = self.pos.remove(k) {
                self.dead[i] = true;
            }
        }
        let u = &d.upserts;
        for i in 0..u.len() {
            let key = u.keys[i];
            let at = match self.pos.get(&key) {
                Some(&at) => at,
                None => {
                    let at = s.rows.len();
                    s.rows.push_meta(0, key, 0, 0, 0, 0, 0);
                    s.rows.data.extend_from_slice(u.row(i, rf));
                    self.dead.push(false);
                    self.pos.insert(key, at);
                    at
                }
            };
            let r = &mut s.rows;
            r.row_ids[at] = u.row_ids[i];
            r.versions[at] = u.versions[i];
            r.update_steps[at] = u.update_steps[i];
            r.access_steps[at] = u.access_steps[i];
            r.update_secs[at] = u.update_secs[i];
            r.freqs[at] = u.freqs[i];
            r.data[at * rf..(at + 1) * rf].copy_from_slice(u.row(i, rf));
        }
        s.version = d.version;
        s.next_row = d.next_row;
        s.free_rows = d.free_rows;
        s.admission = d.admission;
        s.sampler = d.sampler;
        s.sweep_cursor = d.sweep_cursor;
        s.stats = d.stats;
        Ok(())
    }

    /// The merged snapshot: live rows in row-id order, as a table's own snapshot lists them.
    fn finish(self) -> TableSnapshot {
        if !self.changed {
            return self.snap;
        }
        let mut snap = self.snap;
        let rf = snap.row_floats as usize;
        let mut order: Vec<usize> = (0..snap.rows.len()).filter(|&i| !self.dead[i]).collect();
        order.sort_unstable_by_key(|&i| snap.rows.row_ids[i]);
        let old = std::mem::take(&mut snap.rows);
        let mut rows = RowBlock::with_capacity(order.len(), rf);
        for i in order {
            rows.push_meta(
                old.row_ids[i],
                old.keys[i],
                old.versions[i],
                old.update_steps[i],
                old.access_steps[i],
                old.update_secs[i],
                old.freqs[i],
            );
            rows.data.extend_from_slice(old.row(i, rf));
        }
        snap.rows = rows;
        snap
    }
}

/// Brings one shard's snapshot forward through `deltas` (oldest first).
pub fn apply_deltas(
    base: ShardSnapshot,
    deltas: impl IntoIterator<Item = ShardDelta>,
) -> Result<ShardSnapshot, SnapshotError> {
    let ShardSnapshot {
        shard,
        shard_count,
        tables,
    } = base;
    let mut merges: Vec<TableMerge> = tables.into_iter().map(TableMerge::new).collect();
    for d in deltas {
        if d.shard != shard || d.shard_count != shard_count {
            return Err(SnapshotError::Mismatch(format!(
                "a delta of shard {}/{} cannot apply to shard {shard}/{shard_count}",
                d.shard, d.shard_count
            )));
        }
        if d.tables.len() != merges.len() {
            return Err(SnapshotError::Mismatch(format!(
                "a delta of shard {shard} has {} tables, the base has {}",
                d.tables.len(),
                merges.len()
            )));
        }
        for td in d.tables {
            let m = merges
                .iter_mut()
                .find(|m| m.snap.name == td.name)
                .ok_or_else(|| {
                    SnapshotError::Mismatch(format!(
                        "a delta of shard {shard} has unknown table {}",
                        td.name
                    ))
                })?;
            m.apply(td)?;
        }
    }
    Ok(ShardSnapshot {
        shard,
        shard_count,
        tables: merges.into_iter().map(TableMerge::finish).collect(),
    })
}

/// Re-routes every row of `shards` (all shards of one version, in shard order) into `count`
/// shards by [`shard_of`].
///
/// Rows keep their weights, optimizer state and per-row metadata exactly; row ids are
/// renumbered densely. Pending admission moves with its key (counter), or every new shard
/// takes the cell-wise maximum of the old filters (counting Bloom), which can only admit a
/// key early, never late. Table versions take the maximum; cumulative counters restart.
pub fn reshard(
    shards: Vec<ShardSnapshot>,
    count: u32,
) -> Result<Vec<ShardSnapshot>, SnapshotError> {
    if count == 0 {
        return Err(SnapshotError::Mismatch(
            "cannot restore into 0 shards".into(),
        ));
    }
    if shards.len() == count as usize {
        return Ok(shards);
    }
    let Some(first) = shards.first() else {
        return Err(SnapshotError::Mismatch(
            "a version with no shards cannot be re-sharded".into(),
        ));
    };
    let names: Vec<_> = first.tables.iter().map(|t| t.name.clone()).collect();
    let mut out: Vec<ShardSnapshot> = (0..count)
        .map(|s| ShardSnapshot {
            shard: s,
            shard_count: count,
            tables: Vec::with_capacity(names.len()),
        })
        .collect();
    for (ti, name) in names.iter().enumerate() {
        let olds: Vec<&TableSnapshot> = shards
            .iter()
            .map(|s| {
                s.tables.get(ti).filter(|t| t.name == *name).ok_or_else(|| {
                    SnapshotError::Mismatch(format!("shard {} lacks table {name}", s.shard))
                })
            })
            .collect::<Result<_, _>>()?;
        let t0 = olds[0];
        let rf = t0.row_floats as usize;
        let version = olds.iter().map(|t| t.version).max().unwrap_or(0);
        let mut rows: Vec<RowBlock> = (0..count).map(|_| RowBlock::default()).collect();
        for t in &olds {
            if t.row_floats != t0.row_floats || t.dim != t0.dim {
                return Err(SnapshotError::Mismatch(format!(
                    "table {name} has different shapes across shards"
                )));
            }
            for i in 0..t.rows.len() {
                let key = t.rows.keys[i];
                let b = &mut rows[shard_of(key, count) as usize];
                b.push_meta(
                    b.keys.len() as u32,
                    key,
                    t.rows.versions[i],
                    t.rows.update_steps[i],
                    t.rows.access_steps[i],
                    t.rows.update_secs[i],
                    t.rows.freqs[i],
                );
                b.data.extend_from_slice(t.rows.row(i, rf));
            }
        }
        let admission = |s: u32| -> Result<AdmissionSnapshot, SnapshotError> {
            Ok(match &t0.admission {
                AdmissionSnapshot::None => AdmissionSnapshot::None,
                AdmissionSnapshot::Counter(_) => {
                    let mut v = Vec::new();
                    for t in &olds {
                        let AdmissionSnapshot::Counter(p) = &t.admission else {
                            return Err(SnapshotError::Mismatch(format!(
                                "table {name} mixes admission policies"
                            )));
                        };
                        v.extend(p.iter().copied().filter(|&(k, _)| shard_of(k, count) == s));
                    }
                    v.sort_unstable();
                    AdmissionSnapshot::Counter(v)
                }
                AdmissionSnapshot::CountingBloom(c0) => {
                    let mut cells = c0.clone();
                    for t in &olds[1..] {
                        let AdmissionSnapshot::CountingBloom(c) = &t.admission else {
                            return Err(SnapshotError::Mismatch(format!(
                                "table {name} mixes admission policies"
                            )));
                        };
                        if c.len() != cells.len() {
                            return Err(SnapshotError::Mismatch(format!(
                                "table {name} has filters of different sizes"
                            )));
                        }
                        for (a, &b) in cells.iter_mut().zip(c) {
                            *a = (*a).max(b);
                        }
                    }
                    AdmissionSnapshot::CountingBloom(cells)
                }
                AdmissionSnapshot::Probability(_) => {
                    olds[s as usize % olds.len()].admission.clone()
                }
            })
        };
        for (s, block) in rows.into_iter().enumerate() {
            let src = olds[s % olds.len()];
            out[s].tables.push(TableSnapshot {
                name: name.clone(),
                dim: t0.dim,
                optimizer: t0.optimizer.clone(),
                row_floats: t0.row_floats,
                version,
                next_row: block.len() as u32,
                free_rows: Vec::new(),
                rows: block,
                admission: admission(s as u32)?,
                sampler: src.sampler.clone(),
                sweep_cursor: 0,
                stats: TableStats {
                    version,
                    ..TableStats::default()
                },
            });
        }
    }
    Ok(out)
}
