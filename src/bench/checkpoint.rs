//! `freshet bench checkpoint`: the model store's delta size, delta write time and full
//! restore throughput, each against its baseline from the same run.
//!
//! - Delta size is compared with what the changed rows hold: `changed rows x row bytes`
//!   (key plus weights plus optimizer slots), plus the delta's dense part (its diff from the
//!   parent's dense state; the bench's dense state does not change, so the diff is small).
//! - Delta write time is the time from the trainer's capture request until the version is
//!   durable (capture from the shards, encode, write, fsync, rename).
//! - Full restore throughput is compared with a plain sequential read of a file of the same
//!   size on the same disk. Both read cold: the page cache is dropped for the files first
//!   (`posix_fadvise(DONTNEED)` on fsynced files), so the baseline is the disk's, not memory's.
//!   A restore also builds its tables in fresh memory, which the sequential read does not need;
//!   the report measures that memory's first-touch cost and restores once more into memory the
//!   process already had, so the two costs can be told apart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use freshet_actors::ckpt::{ModelStore, Payload, VersionMeta};
use freshet_actors::dense::{DenseNet, InputShape, ModelConfig, ModelKind};
use freshet_actors::embedding::bench::key_of_rank;
use freshet_actors::embedding::{EmbeddingShard, TrainCtx};
use freshet_actors::rng::Xoshiro256;
use freshet_actors::routing::shard_of;
use freshet_actors::sample::Schema;
use freshet_actors::training::default_table_config;
use freshet_actors::TableName;
use serde::Serialize;

use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct CheckpointBenchArgs {
    /// Rows in the table (over all shards).
    #[arg(long, default_value_t = 2_000_000)]
    rows: u64,
    /// Rows changed between two versions.
    #[arg(long, default_value_t = 100_000)]
    changed: u64,
    #[arg(long, default_value_t = 16)]
    dim: usize,
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Deltas written; the median write time is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct CheckpointReport {
    rows: u64,
    changed_rows: u64,
    dim: usize,
    shards: u32,
    optimizer: String,
    /// Key (8) plus weights and optimizer slots (4 per float).
    row_bytes: u64,
    /// The dense state whole, as a full version holds it.
    dense_bytes: u64,
    /// The last delta's dense part: its diff from the parent's.
    dense_diff_bytes: u64,
    delta_bytes: u64,
    /// delta_bytes / (changed_rows x row_bytes + dense_diff_bytes): target <= 1.2.
    delta_vs_rows: f64,
    /// The same without the dense part: the per-row overhead alone.
    delta_row_part_vs_rows: f64,
    delta_capture_ms: f64,
    /// Capture to durable (fsynced and renamed), median over rounds: target <= 200 ms.
    delta_write_ms: f64,
    delta_write_ms_all: Vec<f64>,
    full_bytes: u64,
    full_write_ms: f64,
    /// Restore of the full version into live shards (read, verify, build the tables), cold
    /// cache.
    full_restore_mb_per_s: f64,
    full_restore_ms: f64,
    /// A sequential read of a file of the same size on the same disk, cold cache.
    disk_seq_read_mb_per_s: f64,
    /// full_restore_mb_per_s / disk_seq_read_mb_per_s: target >= 0.5.
    restore_vs_seq_read: f64,
    /// Both again with the files in the page cache, for context.
    warm_restore_mb_per_s: f64,
    warm_seq_read_mb_per_s: f64,
    /// Bytes of table memory (rows, metadata, index) the restore built.
    restored_table_bytes: u64,
    /// First-touch throughput of fresh huge-page memory in this process: the price of every
    /// byte of `restored_table_bytes` in the cold restore above.
    fresh_memory_mb_per_s: f64,
    /// The cold restore again, right after the warm one freed its tables, so the tables get
    /// memory the process already had. Cold file cache as above; the gap to
    /// `full_restore_mb_per_s` is the fresh memory's cost.
    recycled_memory_restore_mb_per_s: f64,
    recycled_memory_restore_vs_seq_read: f64,
}

/// Drops `path`'s pages from the page cache (it must be fsynced: dirty pages stay).
#[allow(unsafe_code)] // one libc call, no pointers
fn drop_cache(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid open descriptor; fadvise only advises the kernel.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(r == 0, "posix_fadvise on {} failed: {r}", path.display());
    Ok(())
}

fn drop_cache_dir(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        drop_cache(&e?.path())?;
    }
    Ok(())
}

fn seq_read(path: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    Ok(n as f64 / 1e6 / t.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn run(a: CheckpointBenchArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.changed <= a.rows && a.rows > 0 && a.shards > 0 && a.rounds > 0,
        "--changed must be at most --rows, and --rows, --shards, --rounds positive"
    );
    let base = settings.node.data_dir.join("bench");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let tmp = tempfile::tempdir_in(&base).context("creating a scratch directory")?;
    let store = ModelStore::open(tmp.path().join("store"))?;

    let name = TableName::new("emb");
    let cfg = default_table_config(a.dim);
    let row_bytes = 8 + 4 * (a.dim as u64 + cfg.optimizer.state_floats(a.dim) as u64);
    let tables = vec![(name.clone(), cfg.clone())];
    let mut shards: Vec<EmbeddingShard> = (0..a.shards)
        .map(|s| EmbeddingShard::new(s, a.shards, &tables, None))
        .collect::<Result<_, _>>()?;
    eprintln!(
        "populating {} rows of dim {} in {} shards",
        a.rows, a.dim, a.shards
    );
    let mut per_shard: Vec<Vec<u64>> = vec![Vec::new(); a.shards as usize];
    let mut out = Vec::new();
    for r in 0..a.rows {
        let k = key_of_rank(r, 7);
        let s = shard_of(k, a.shards) as usize;
        per_shard[s].push(k);
        if per_shard[s].len() == 4096 {
            shards[s].table_mut(&name)?.lookup_for_training(
                &per_shard[s],
                &TrainCtx::at_step(1),
                &mut out,
            )?;
            per_shard[s].clear();
        }
    }
    for (s, keys) in per_shard.iter().enumerate() {
        shards[s]
            .table_mut(&name)?
            .lookup_for_training(keys, &TrainCtx::at_step(1), &mut out)?;
    }

    let net = DenseNet::new(
        ModelConfig::new(ModelKind::Wdl),
        InputShape {
            fields: vec![a.dim; 26],
            dense: 13,
        },
    )?;
    let dense = net.state();
    let meta = |step: u64| VersionMeta {
        step,
        rows_trained: step * 512,
        samples_rejected: 0,
        replays: Vec::new(),
        calibrated_from: None,
        sample_offsets: BTreeMap::from([(0, step * 512)]),
        joiner_offsets: BTreeMap::new(),
        model: ModelConfig::new(ModelKind::Wdl),
        schema: Schema::criteo(a.dim),
        tables: BTreeMap::from([(name.to_string(), cfg.clone())]),
        placement: None,
    };

    // The full version.
    let t = Instant::now();
    let snaps: Vec<_> = shards
        .iter_mut()
        .map(|s| s.snapshot())
        .collect::<Result<_, _>>()?;
    let full = store.write(meta(1), &dense, &Payload::Full(snaps))?;
    let full_write_ms = t.elapsed().as_secs_f64() * 1e3;
    let dense_bytes = full.files.get("dense.msgpack").map_or(0, |f| f.bytes);
    eprintln!(
        "full version: {:.1} MB in {full_write_ms:.0} ms",
        full.bytes() as f64 / 1e6
    );
    let mut since: Vec<Vec<(TableName, u64)>> = shards
        .iter()
        .map(|s| vec![(name.clone(), s.table(&name).map_or(0, |t| t.version()))])
        .collect();
    let mut parent = full.version;

    // Deltas of `changed` distinct rows each.
    let mut rng = Xoshiro256::seed_from_u64(11);
    let mut ranks: Vec<u64> = (0..a.rows).collect();
    let (mut writes, mut captures, mut delta_bytes) = (Vec::new(), Vec::new(), 0);
    let mut dense_diff_bytes = 0;
    for round in 0..a.rounds {
        rng.shuffle(&mut ranks);
        let step = 2 + round as u64;
        let ctx = TrainCtx::at_step(step);
        let mut keys: Vec<Vec<u64>> = vec![Vec::new(); a.shards as usize];
        for &r in &ranks[..a.changed as usize] {
            let k = key_of_rank(r, 7);
            keys[shard_of(k, a.shards) as usize].push(k);
        }
        for (s, ks) in keys.iter().enumerate() {
            let t = shards[s].table_mut(&name)?;
            t.lookup_for_training(ks, &ctx, &mut out)?;
            let grads: Vec<f32> = (0..ks.len() * a.dim)
                .map(|_| rng.next_f32() - 0.5)
                .collect();
            t.apply_gradients(ks, &grads, &ctx)?;
        }
        let t = Instant::now();
        let deltas: Vec<_> = shards
            .iter_mut()
            .zip(&since)
            .map(|(s, v)| s.delta_since(v))
            .collect::<Result<_, _>>()?;
        captures.push(t.elapsed().as_secs_f64() * 1e3);
        // The parent's dense state at hand, as the CheckpointWriter keeps it.
        let m = store.write_after(
            meta(step),
            &dense,
            &Payload::Delta {
                parent,
                shards: deltas,
            },
            Some((parent, &dense)),
        )?;
        writes.push(t.elapsed().as_secs_f64() * 1e3);
        delta_bytes = m.bytes();
        dense_diff_bytes = m.files.get("dense.diff.msgpack").map_or(0, |f| f.bytes);
        parent = m.version;
        since = shards
            .iter()
            .map(|s| vec![(name.clone(), s.table(&name).map_or(0, |t| t.version()))])
            .collect();
        for (s, v) in shards.iter_mut().zip(&since) {
            s.forget_changes_through(v);
        }
        eprintln!(
            "delta {}: {:.1} MB in {:.0} ms",
            round + 1,
            m.bytes() as f64 / 1e6,
            writes[round]
        );
    }
    let delta_write_ms_all = writes.clone();
    let delta_write_ms = median(&mut writes);
    let delta_capture_ms = median(&mut captures);
    let rows_part = a.changed * row_bytes;

    // Full restore, cold, into live shards; then the disk's own sequential read.
    let vdir = store.version_dir(full.version);
    // As the shard owners restore: each shard streams its own file into its tables on its own
    // thread, so one shard's reads overlap another's build.
    // Returns the restore's time, the bytes of table memory it built and, when asked, the
    // first-touch rate of as much fresh memory, taken while the restored tables still hold
    // theirs (so that it cannot be handed memory they just freed).
    let restore_once = |shards_n: u32, measure_fresh: bool| -> anyhow::Result<(f64, u64, f64)> {
        let t = Instant::now();
        let live = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..shards_n)
                .map(|i| {
                    let (store, tables) = (&store, &tables);
                    sc.spawn(move || -> anyhow::Result<EmbeddingShard> {
                        let mut live = EmbeddingShard::new(i, shards_n, tables, None)?;
                        store.restore_shard_into(full.version, &mut live)?;
                        Ok(live)
                    })
                })
                .collect();
            let (_, dense) = store.restore_dense(full.version)?;
            drop(dense);
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a restore thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<EmbeddingShard>>>()
        })?;
        let secs = t.elapsed().as_secs_f64();
        let table_bytes: u64 = live
            .iter()
            .flat_map(|s| s.stats())
            .map(|(_, s)| s.hot_bytes + s.index_bytes)
            .sum();
        let fresh = if measure_fresh {
            freshet_actors::embedding::bench::fresh_memory_mb_per_s(table_bytes as usize)
        } else {
            0.0
        };
        drop(live);
        Ok((secs, table_bytes, fresh))
    };
    drop_cache_dir(&vdir)?;
    let (cold_s, table_bytes, fresh_mem) = restore_once(a.shards, true)?;
    let (warm_s, _, _) = restore_once(a.shards, false)?;
    // The cold restore once more, at once: its tables get the memory the warm one just freed
    // (before the kernel can report it free to a hypervisor), so the gap to the first cold
    // restore is what fresh memory cost.
    drop_cache_dir(&vdir)?;
    let (recycled_s, _, _) = restore_once(a.shards, false)?;
    let mb = full.bytes() as f64 / 1e6;
    // A plain file of the same size, written and fsynced, read back cold and warm.
    let plain = tmp.path().join("seq-read");
    {
        let mut f = std::fs::File::create(&plain)?;
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 31) as u8).collect();
        let mut left = full.bytes();
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    drop_cache(&plain)?;
    let disk = seq_read(&plain)?;
    let warm_disk = seq_read(&plain)?;
    let report = CheckpointReport {
        rows: a.rows,
        changed_rows: a.changed,
        dim: a.dim,
        shards: a.shards,
        optimizer: cfg.optimizer.name().to_string(),
        row_bytes,
        dense_bytes,
        dense_diff_bytes,
        delta_bytes,
        delta_vs_rows: delta_bytes as f64 / (rows_part + dense_diff_bytes) as f64,
        delta_row_part_vs_rows: delta_bytes.saturating_sub(dense_diff_bytes) as f64
            / rows_part as f64,
        delta_capture_ms,
        delta_write_ms,
        delta_write_ms_all,
        full_bytes: full.bytes(),
        full_write_ms,
        full_restore_mb_per_s: mb / cold_s,
        full_restore_ms: cold_s * 1e3,
        disk_seq_read_mb_per_s: disk,
        restore_vs_seq_read: (mb / cold_s) / disk,
        warm_restore_mb_per_s: mb / warm_s,
        warm_seq_read_mb_per_s: warm_disk,
        restored_table_bytes: table_bytes,
        fresh_memory_mb_per_s: fresh_mem,
        recycled_memory_restore_mb_per_s: mb / recycled_s,
        recycled_memory_restore_vs_seq_read: (mb / recycled_s) / disk,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
