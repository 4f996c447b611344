//! `freshet bench embedding`: the table's lookup and lookup+update against an ahash
//! `HashMap` and a memory-limit probe in the same run, and the same workload with most rows in
//! the on-disk tier.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use freshet_actors::embedding::bench::{key_of_rank, zipf_batches, HashMapBaseline, MemoryProbe};
use freshet_actors::embedding::{Initializer, OptimizerConfig, Table, TableConfig, TrainCtx};
use freshet_actors::rng::Xoshiro256;
use freshet_actors::TableName;
use serde::Serialize;

use crate::settings::Settings;

use super::{median, progress};

#[derive(Debug, Args)]
pub(crate) struct EmbeddingArgs {
    /// Distinct keys in the table.
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    #[arg(long, default_value_t = 16)]
    dim: usize,
    /// Zipf exponent of key popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Distinct keys per batch.
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Batches per measured pass.
    #[arg(long, default_value_t = 256)]
    batches: usize,
    /// Measured passes per subject; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Share of rows the DRAM budget holds in the tiered run (0 skips it).
    #[arg(long, default_value_t = 0.3)]
    tier_fraction: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct EmbeddingReport {
    keys: u64,
    dim: usize,
    zipf: f64,
    batch: usize,
    batches: usize,
    rounds: usize,
    table_lookup_keys_per_s: f64,
    table_lookup_update_keys_per_s: f64,
    /// The two halves of lookup+update, timed inside the same pass (the gradient half reuses
    /// the lookup's key resolution, as in training).
    table_training_lookup_keys_per_s: f64,
    table_apply_keys_per_s: f64,
    hashmap_lookup_keys_per_s: f64,
    hashmap_lookup_update_keys_per_s: f64,
    probe_reads_per_s: f64,
    probe_buffer_bytes: usize,
    table_bytes: u64,
    lookup_update_vs_hashmap: f64,
    lookup_vs_hashmap: f64,
    lookup_vs_probe: f64,
    tiered: Option<TieredReport>,
}

#[derive(Debug, Serialize)]
struct TieredReport {
    dram_fraction: f64,
    lookup_update_keys_per_s: f64,
    vs_all_dram: f64,
    hot_rows: u64,
    cold_rows: u64,
    tier_hit_rate: f64,
}

/// Times `f` over `rounds` passes; returns keys/s of the median pass.
fn median_rate(rounds: usize, keys_per_pass: usize, mut f: impl FnMut()) -> f64 {
    let rates: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            keys_per_pass as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    median(&rates)
}

/// Progress goes to stderr always: stdout carries only the report, so `--json` stays parseable.
fn adagrad_table(
    dim: usize,
    budget: Option<u64>,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<Table> {
    Ok(Table::new(
        TableName::new("bench"),
        adagrad_config(dim, budget),
        dir,
    )?)
}

fn adagrad_config(dim: usize, budget: Option<u64>) -> TableConfig {
    TableConfig {
        init: Initializer::Uniform { scale: 0.01 },
        optimizer: OptimizerConfig::default(),
        dram_budget_bytes: budget,
        ..TableConfig::with_dim(dim)
    }
}

/// Inserts every key in random order, so that a key's rank says nothing about where its row is.
fn populate(t: &mut Table, keys: u64, seed: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut ranks: Vec<u32> = (0..keys as u32).collect();
    Xoshiro256::seed_from_u64(seed).shuffle(&mut ranks);
    let mut out = Vec::new();
    // Batches no larger than a training batch: a batch is pinned in DRAM while it runs, so
    // a huge one would stretch a small DRAM budget.
    let mut batch = Vec::with_capacity(4096);
    for (i, chunk) in ranks.chunks(4096).enumerate() {
        batch.clear();
        batch.extend(chunk.iter().map(|&r| key_of_rank(u64::from(r), seed)));
        out.clear();
        t.lookup_for_training(&batch, &TrainCtx::at_step(0), &mut out)?;
        let done = (i + 1) * 4096;
        if done % (1 << 21) == 0 {
            progress(&format!("  populated {done} of {keys} keys"));
        }
    }
    progress(&format!(
        "  populated {keys} keys in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

pub(super) fn run(a: EmbeddingArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.keys > 0 && a.keys <= u64::from(u32::MAX),
        "--keys must be in 1..=2^32-1"
    );
    anyhow::ensure!(a.dim > 0 && a.dim <= 1024, "--dim must be in 1..=1024");
    anyhow::ensure!(a.zipf > 0.0 && a.zipf.is_finite(), "--zipf must be > 0");
    anyhow::ensure!(
        a.batch > 0 && a.batches > 0,
        "--batch and --batches must be > 0"
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&a.tier_fraction),
        "--tier-fraction must be in [0, 1)"
    );
    let d = a.dim;
    progress(&format!(
        "freshet bench embedding: {} keys, dim {d}, zipf {}, batch {}",
        a.keys, a.zipf, a.batch
    ));
    let batches = zipf_batches(a.keys, a.zipf, a.batch, a.batches, a.seed);
    let per_pass: usize = batches.iter().map(Vec::len).sum();
    let mut rng = Xoshiro256::seed_from_u64(a.seed);
    let grads: Vec<f32> = (0..a.batch * d)
        .map(|_| rng.next_f32() * 0.02 - 0.01)
        .collect();

    progress("table (all DRAM):");
    let mut table = adagrad_table(d, None, None)?;
    populate(&mut table, a.keys, a.seed)?;
    let st = table.stats();
    let table_bytes = st.hot_bytes + st.index_bytes;

    progress("baseline HashMap<u64, Vec<f32>> (ahash):");
    let started = Instant::now();
    let mut map = HashMapBaseline::new(d, a.keys as usize);
    for r in 0..a.keys {
        map.insert(key_of_rank(r, a.seed));
    }
    progress(&format!(
        "  populated in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let probe = MemoryProbe::new(table_bytes as usize);
    let probe_batches = probe.batches(a.batch, a.batches, a.seed);

    let mut out = Vec::with_capacity(a.batch * d);
    let mut step = 1u64;
    // Interleave subjects round by round, so that drift hits all of them alike.
    let mut rates = [
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    ];
    for round in 0..a.rounds.max(1) {
        rates[0].push(median_rate(1, per_pass, || {
            for b in &batches {
                out.clear();
                table.lookup(b, &mut out).expect("lookup of a valid table");
            }
        }));
        let mut halves = Halves::default();
        rates[1].push(median_rate(1, per_pass, || {
            halves = train_pass(&mut table, &batches, &grads, &mut step, &mut out)
        }));
        rates[5].push(per_pass as f64 / halves.lookup_secs);
        rates[6].push(per_pass as f64 / halves.apply_secs);
        rates[2].push(median_rate(1, per_pass, || {
            for b in &batches {
                out.clear();
                map.lookup(b, &mut out);
            }
        }));
        rates[3].push(median_rate(1, per_pass, || {
            for b in &batches {
                out.clear();
                map.lookup(b, &mut out);
                map.adagrad(b, &grads[..b.len() * d], 0.05);
            }
        }));
        rates[4].push(median_rate(1, per_pass, || {
            for b in &probe_batches {
                out.clear();
                probe.read(b, d, &mut out);
            }
        }));
        progress(&format!(
            "  round {} of {} measured",
            round + 1,
            a.rounds.max(1)
        ));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [t_lookup, t_update, m_lookup, m_update, p_read, t_train_lookup, t_apply] =
        rates.map(|mut v| med(&mut v));
    drop(map);

    let tiered = if a.tier_fraction > 0.0 {
        progress(&format!(
            "table with a DRAM budget of {:.0}% of rows:",
            a.tier_fraction * 100.0
        ));
        let slot_bytes = Table::hot_slot_bytes(&adagrad_config(d, None)) as f64;
        let budget = (a.keys as f64 * a.tier_fraction * slot_bytes) as u64;
        let dir = tempfile_dir(&settings.spill_dir())?;
        let mut tiered = adagrad_table(d, Some(budget.max(1)), Some(&dir))?;
        populate(&mut tiered, a.keys, a.seed)?;
        // One unmeasured pass lets the hot set settle into DRAM, as in a running trainer.
        for b in &batches {
            out.clear();
            tiered.lookup_for_training(b, &TrainCtx::at_step(step), &mut out)?;
        }
        let rate = median_rate(a.rounds, per_pass, || {
            train_pass(&mut tiered, &batches, &grads, &mut step, &mut out);
        });
        let s = tiered.stats();
        drop(tiered);
        let _ = std::fs::remove_dir_all(&dir);
        Some(TieredReport {
            dram_fraction: a.tier_fraction,
            lookup_update_keys_per_s: rate,
            vs_all_dram: rate / t_update,
            hot_rows: s.hot_rows,
            cold_rows: s.cold_rows,
            tier_hit_rate: s.tier_hit_rate(),
        })
    } else {
        None
    };

    let report = EmbeddingReport {
        keys: a.keys,
        dim: d,
        zipf: a.zipf,
        batch: a.batch,
        batches: a.batches,
        rounds: a.rounds,
        table_lookup_keys_per_s: t_lookup,
        table_lookup_update_keys_per_s: t_update,
        table_training_lookup_keys_per_s: t_train_lookup,
        table_apply_keys_per_s: t_apply,
        hashmap_lookup_keys_per_s: m_lookup,
        hashmap_lookup_update_keys_per_s: m_update,
        probe_reads_per_s: p_read,
        probe_buffer_bytes: probe.bytes(),
        table_bytes,
        lookup_update_vs_hashmap: t_update / m_update,
        lookup_vs_hashmap: t_lookup / m_lookup,
        lookup_vs_probe: t_lookup / p_read,
        tiered,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let m = |x: f64| format!("{:>8.2} M/s", x / 1e6);
        println!(
            "lookup          table {}  hashmap {}  ratio {:.2}x",
            m(t_lookup),
            m(m_lookup),
            report.lookup_vs_hashmap
        );
        println!(
            "lookup+adagrad  table {}  hashmap {}  ratio {:.2}x",
            m(t_update),
            m(m_update),
            report.lookup_update_vs_hashmap
        );
        println!(
            "  of which      training lookup {}  apply {}",
            m(t_train_lookup),
            m(t_apply)
        );
        println!(
            "memory probe    {}            lookup at {:.0}% of it",
            m(p_read),
            report.lookup_vs_probe * 100.0
        );
        if let Some(t) = &report.tiered {
            println!(
                "tiered ({:.0}% in DRAM) lookup+adagrad {}  = {:.0}% of all-DRAM, hit rate {:.3}",
                t.dram_fraction * 100.0,
                m(t.lookup_update_keys_per_s),
                t.vs_all_dram * 100.0,
                t.tier_hit_rate
            );
        }
    }
    Ok(())
}

/// Seconds spent in each half of a pass of training steps.
#[derive(Clone, Copy, Debug, Default)]
struct Halves {
    lookup_secs: f64,
    apply_secs: f64,
}

/// One pass of training steps: a training lookup, then the gradients for the same keys.
fn train_pass(
    t: &mut Table,
    batches: &[Vec<u64>],
    grads: &[f32],
    step: &mut u64,
    out: &mut Vec<f32>,
) -> Halves {
    let d = t.dim();
    let mut halves = Halves::default();
    for b in batches {
        out.clear();
        let ctx = TrainCtx::at_step(*step);
        *step += 1;
        let started = Instant::now();
        t.lookup_for_training(b, &ctx, out)
            .expect("training lookup");
        let looked_up = Instant::now();
        t.apply_gradients(b, &grads[..b.len() * d], &ctx)
            .expect("gradients");
        halves.lookup_secs += (looked_up - started).as_secs_f64();
        halves.apply_secs += looked_up.elapsed().as_secs_f64();
    }
    halves
}

/// A fresh directory for this run's spill files under the configured spill dir.
fn tempfile_dir(base: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = base.join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("while creating {}", dir.display()))?;
    Ok(dir)
}
