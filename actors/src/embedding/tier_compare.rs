//! The on-disk tier's store, chosen by benchmark: the own log-structured [`SpillStore`]
//! against `redb` and `fjall` on the tier's workload (cargo feature `tier-compare`; run by
//! `cargo bench --bench tier_store --features tier-compare`).
//!
//! The workload is what a tiered table asks of its store, nothing more:
//! - **load**: `rows` cold rows written once (a table filling past its DRAM budget);
//! - **steps**: each step promotes `per_step` random cold rows (a batch's tier misses: read
//!   them, the store may forget them) and demotes as many random hot rows (write them back).
//!
//! Every store gets the same keys, rows and order, and every row read is checked against the
//! row written, so a store cannot win by returning the wrong bytes. The own store runs its
//! compaction the way the table does (at most one segment per step); the key-value stores run
//! their own background maintenance. Durability is off for all three (no fsync on commit): the
//! tier is a cache that is emptied on open.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use redb::ReadableDatabase;
use serde::Serialize;

use super::tier::SpillStore;
use crate::rng::Xoshiro256;

/// The workload's shape.
#[derive(Clone, Debug, Serialize)]
pub struct CompareConfig {
    /// Cold rows loaded before the steps.
    pub rows: u64,
    /// Floats per row: 32 is dim 16 with Adagrad.
    pub row_floats: usize,
    /// Rows promoted (and as many demoted) per step.
    pub per_step: usize,
    pub steps: usize,
    pub seed: u64,
}

impl Default for CompareConfig {
    fn default() -> Self {
        // 4096-key batches at the tier hit rate `freshet bench embedding` reports for 30% of
        // the rows in DRAM (`docs/performance.md`) leave a few hundred misses per batch.
        Self {
            rows: 2_000_000,
            row_floats: 32,
            per_step: 280,
            steps: 2_000,
            seed: 1,
        }
    }
}

/// One store's figures.
#[derive(Clone, Debug, Serialize)]
pub struct StoreFigures {
    pub store: String,
    /// Rows written per second while loading.
    pub load_rows_per_sec: f64,
    /// Rows promoted per second, counting only the time spent promoting.
    pub promote_rows_per_sec: f64,
    /// Rows demoted per second, counting only the time spent demoting (and, for the own store,
    /// compacting).
    pub demote_rows_per_sec: f64,
    /// Promoted plus demoted rows per second over whole steps: the figure that decides.
    pub step_rows_per_sec: f64,
    /// Bytes on disk after the steps.
    pub disk_bytes: u64,
}

/// What each store must do for the tier.
trait ColdStore {
    fn name(&self) -> String;
    fn load(&mut self, keys: &[u64], rows: &dyn Fn(u64, &mut [f32])) -> anyhow::Result<()>;
    /// Reads `keys`' rows into `out` (row after row); the store may drop them.
    fn promote(&mut self, keys: &[u64], out: &mut Vec<f32>) -> anyhow::Result<()>;
    fn demote(&mut self, keys: &[u64], rows: &[f32]) -> anyhow::Result<()>;
    fn disk_bytes(&self) -> u64;
}

/// The row every store must hold for `key` after `gen` demotions: cheap to recompute, so
/// every read can be checked.
fn row_of(key: u64, generation: u32, out: &mut [f32]) {
    for (j, x) in out.iter_mut().enumerate() {
        *x = (key % 1_000_003) as f32 + j as f32 * 0.5 + generation as f32 * 1000.0;
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The own store, with the location map a table keeps in its DRAM arena.
struct Own {
    store: SpillStore,
    loc: HashMap<u64, u64>,
    reqs: Vec<(u64, u64, usize)>,
}

impl ColdStore for Own {
    fn name(&self) -> String {
        "own log-structured (SpillStore)".into()
    }

    fn load(&mut self, keys: &[u64], rows: &dyn Fn(u64, &mut [f32])) -> anyhow::Result<()> {
        let mut row = vec![0.0; self.store_floats()];
        for &k in keys {
            rows(k, &mut row);
            let at = self.store.append(k, &row)?;
            self.loc.insert(k, at);
        }
        Ok(())
    }

    fn promote(&mut self, keys: &[u64], out: &mut Vec<f32>) -> anyhow::Result<()> {
        let rf = self.store_floats();
        self.reqs.clear();
        for (i, k) in keys.iter().enumerate() {
            let at = self
                .loc
                .remove(k)
                .ok_or_else(|| anyhow::anyhow!("key {k} is not cold"))?;
            self.reqs.push((at, *k, i));
        }
        out.clear();
        out.resize(keys.len() * rf, 0.0);
        self.store.read_many(&mut self.reqs, |i, row| {
            out[i * rf..(i + 1) * rf].copy_from_slice(row)
        })?;
        for &(at, _, _) in &self.reqs {
            self.store.free(at)?;
        }
        Ok(())
    }

    fn demote(&mut self, keys: &[u64], rows: &[f32]) -> anyhow::Result<()> {
        let rf = self.store_floats();
        for (i, &k) in keys.iter().enumerate() {
            let at = self.store.append(k, &rows[i * rf..(i + 1) * rf])?;
            self.loc.insert(k, at);
        }
        // As the table does after each training call: compact at most one segment.
        if let Some(sid) = self.store.compaction_candidate() {
            for (at, key, payload) in self.store.records(sid)? {
                if self.loc.get(&key) == Some(&at) {
                    let new_at = self.store.append(key, &payload)?;
                    self.loc.insert(key, new_at);
                    self.store.free(at)?;
                }
            }
        }
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        self.store.disk_bytes()
    }
}

impl Own {
    fn store_floats(&self) -> usize {
        self.store.payload_floats()
    }
}

struct Redb {
    db: redb::Database,
    dir: std::path::PathBuf,
    row_floats: usize,
}

const REDB_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("rows");

impl Redb {
    fn write(
        &self,
        keys: &[u64],
        row: &mut dyn FnMut(usize, u64) -> Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::None)?;
        {
            let mut t = tx.open_table(REDB_TABLE)?;
            for (i, &k) in keys.iter().enumerate() {
                t.insert(k, row(i, k).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl ColdStore for Redb {
    fn name(&self) -> String {
        "redb 4".into()
    }

    fn load(&mut self, keys: &[u64], rows: &dyn Fn(u64, &mut [f32])) -> anyhow::Result<()> {
        let mut row = vec![0.0; self.row_floats];
        for chunk in keys.chunks(100_000) {
            self.write(chunk, &mut |_, k| {
                rows(k, &mut row);
                bytemuck::cast_slice(&row).to_vec()
            })?;
        }
        Ok(())
    }

    fn promote(&mut self, keys: &[u64], out: &mut Vec<f32>) -> anyhow::Result<()> {
        out.clear();
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REDB_TABLE)?;
        for k in keys {
            let v = t
                .get(k)?
                .ok_or_else(|| anyhow::anyhow!("redb lost key {k}"))?;
            out.extend(
                v.value()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(())
    }

    fn demote(&mut self, keys: &[u64], rows: &[f32]) -> anyhow::Result<()> {
        let rf = self.row_floats;
        self.write(keys, &mut |i, _| {
            bytemuck::cast_slice(&rows[i * rf..(i + 1) * rf]).to_vec()
        })
    }

    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

struct Fjall {
    // Declared first so it drops before the database.
    rows: fjall::Keyspace,
    db: fjall::Database,
    dir: std::path::PathBuf,
    row_floats: usize,
}

impl ColdStore for Fjall {
    fn name(&self) -> String {
        "fjall 3".into()
    }

    fn load(&mut self, keys: &[u64], rows: &dyn Fn(u64, &mut [f32])) -> anyhow::Result<()> {
        let mut row = vec![0.0; self.row_floats];
        for chunk in keys.chunks(100_000) {
            let mut b = self.db.batch().durability(None);
            for &k in chunk {
                rows(k, &mut row);
                b.insert(
                    &self.rows,
                    k.to_be_bytes(),
                    bytemuck::cast_slice::<f32, u8>(&row),
                );
            }
            b.commit()?;
        }
        Ok(())
    }

    fn promote(&mut self, keys: &[u64], out: &mut Vec<f32>) -> anyhow::Result<()> {
        out.clear();
        for k in keys {
            let v = self
                .rows
                .get(k.to_be_bytes())?
                .ok_or_else(|| anyhow::anyhow!("fjall lost key {k}"))?;
            out.extend(
                v.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(())
    }

    fn demote(&mut self, keys: &[u64], rows: &[f32]) -> anyhow::Result<()> {
        let rf = self.row_floats;
        let mut b = self.db.batch().durability(None);
        for (i, &k) in keys.iter().enumerate() {
            b.insert(
                &self.rows,
                k.to_be_bytes(),
                bytemuck::cast_slice::<f32, u8>(&rows[i * rf..(i + 1) * rf]),
            );
        }
        b.commit()?;
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

/// Runs the workload on every store under `dir` (one subdirectory each), printing progress to
/// stderr. Stores run one after another so they never share the machine.
pub fn run(cfg: &CompareConfig, dir: &Path) -> anyhow::Result<Vec<StoreFigures>> {
    anyhow::ensure!(
        cfg.rows as usize > 2 * cfg.per_step,
        "too few rows for the step size"
    );
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for which in ["own", "redb", "fjall"] {
        let sub = dir.join(which);
        std::fs::create_dir_all(&sub)?;
        let mut store: Box<dyn ColdStore> = match which {
            "own" => Box::new(Own {
                store: SpillStore::open(&sub, cfg.row_floats)?,
                loc: HashMap::with_capacity(cfg.rows as usize),
                reqs: Vec::new(),
            }),
            "redb" => Box::new(Redb {
                db: redb::Database::create(sub.join("tier.redb"))?,
                dir: sub.clone(),
                row_floats: cfg.row_floats,
            }),
            _ => {
                let db = fjall::Database::builder(&sub).open()?;
                let rows = db.keyspace("rows", fjall::KeyspaceCreateOptions::default)?;
                Box::new(Fjall {
                    rows,
                    db,
                    dir: sub.clone(),
                    row_floats: cfg.row_floats,
                })
            }
        };
        let figures = run_one(cfg, store.as_mut())?;
        eprintln!(
            "tier-store: {:<32} load {:>10.0} rows/s  promote {:>10.0}  demote {:>10.0}  step {:>10.0} rows/s  disk {:.0} MB",
            figures.store,
            figures.load_rows_per_sec,
            figures.promote_rows_per_sec,
            figures.demote_rows_per_sec,
            figures.step_rows_per_sec,
            figures.disk_bytes as f64 / 1e6
        );
        out.push(figures);
        drop(store);
        std::fs::remove_dir_all(&sub)?;
    }
    Ok(out)
}

fn run_one(cfg: &CompareConfig, store: &mut dyn ColdStore) -> anyhow::Result<StoreFigures> {
    let rf = cfg.row_floats;
    let mut rng = Xoshiro256::seed_from_u64(cfg.seed);
    // Scattered keys, as a table's are.
    let keys: Vec<u64> = (0..cfg.rows)
        .map(|i| crate::routing::mix64(i ^ 0x7ee1))
        .collect();
    let mut generation: HashMap<u64, u32> = HashMap::with_capacity(keys.len());
    let t = Instant::now();
    store.load(&keys, &|k, row| row_of(k, 0, row))?;
    let load_secs = t.elapsed().as_secs_f64();

    let mut cold = keys;
    let mut hot: Vec<u64> = Vec::new();
    let (mut promote_secs, mut demote_secs) = (0.0, 0.0);
    let mut buf = Vec::new();
    let mut want = vec![0.0f32; rf];
    let mut batch = Vec::with_capacity(cfg.per_step);
    let mut rows = Vec::with_capacity(cfg.per_step * rf);
    let t_steps = Instant::now();
    for step in 0..cfg.steps {
        batch.clear();
        for _ in 0..cfg.per_step {
            let i = rng.below(cold.len() as u64) as usize;
            batch.push(cold.swap_remove(i));
        }
        let t = Instant::now();
        store.promote(&batch, &mut buf)?;
        promote_secs += t.elapsed().as_secs_f64();
        anyhow::ensure!(buf.len() == batch.len() * rf, "short promotion");
        for (i, &k) in batch.iter().enumerate() {
            row_of(k, generation.get(&k).copied().unwrap_or(0), &mut want);
            anyhow::ensure!(
                buf[i * rf..(i + 1) * rf] == want[..],
                "{}: wrong row for key {k} at step {step}",
                store.name()
            );
        }
        hot.extend_from_slice(&batch);

        batch.clear();
        rows.clear();
        for _ in 0..cfg.per_step {
            let i = rng.below(hot.len() as u64) as usize;
            let k = hot.swap_remove(i);
            let g = generation.entry(k).or_insert(0);
            *g += 1;
            row_of(k, *g, &mut want);
            rows.extend_from_slice(&want);
            batch.push(k);
        }
        let t = Instant::now();
        store.demote(&batch, &rows)?;
        demote_secs += t.elapsed().as_secs_f64();
        cold.extend_from_slice(&batch);
        if step % 500 == 499 {
            eprintln!(
                "tier-store: {}: step {}/{}",
                store.name(),
                step + 1,
                cfg.steps
            );
        }
    }
    let step_secs = t_steps.elapsed().as_secs_f64();
    let moved = (cfg.steps * cfg.per_step) as f64;
    Ok(StoreFigures {
        store: store.name(),
        load_rows_per_sec: cfg.rows as f64 / load_secs.max(1e-9),
        promote_rows_per_sec: moved / promote_secs.max(1e-9),
        demote_rows_per_sec: moved / demote_secs.max(1e-9),
        // The whole step, including choosing and checking rows, which costs every store alike.
        step_rows_per_sec: 2.0 * moved / step_secs.max(1e-9),
        disk_bytes: store.disk_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_returns_the_rows_written() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CompareConfig {
            rows: 5_000,
            per_step: 50,
            steps: 40,
            ..CompareConfig::default()
        };
        let figures = run(&cfg, dir.path()).unwrap();
        assert_eq!(figures.len(), 3);
        assert!(figures.iter().all(|f| f.step_rows_per_sec > 0.0));
    }
}
