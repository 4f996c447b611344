//! Table tests: a reference model, policies, change tracking, tiering and snapshots.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::embedding::config::{AdmissionConfig, EvictionConfig, Initializer, OptimizerConfig};
use crate::embedding::EmbeddingShard;
use crate::rng::Xoshiro256;

fn table(cfg: TableConfig) -> Table {
    Table::new(TableName::new("t"), cfg, None).unwrap()
}

fn lookup(t: &mut Table, keys: &[u64]) -> Vec<f32> {
    let mut out = Vec::new();
    t.lookup(keys, &mut out).unwrap();
    out
}

fn train_lookup(t: &mut Table, keys: &[u64], step: u64) -> Vec<f32> {
    let mut out = Vec::new();
    t.lookup_for_training(keys, &TrainCtx::at_step(step), &mut out)
        .unwrap();
    out
}

#[test]
fn plain_lookup_reads_default_row_and_never_inserts() {
    let mut cfg = TableConfig::with_dim(4);
    cfg.default_value = 0.5;
    let mut t = table(cfg);
    assert_eq!(lookup(&mut t, &[1, 2]), vec![0.5; 8]);
    assert!(t.is_empty());
    assert_eq!(t.version(), 0);
    train_lookup(&mut t, &[1], 0);
    assert_eq!(t.len(), 1);
    let v = lookup(&mut t, &[1, 2]);
    assert_ne!(&v[..4], &[0.5; 4]);
    assert_eq!(&v[4..], &[0.5; 4]);
    assert_eq!(t.len(), 1, "plain lookup inserted a key");
}

#[test]
fn initial_rows_do_not_depend_on_arrival_order_or_shard() {
    let cfg = TableConfig {
        init: Initializer::Normal {
            mean: 0.0,
            std: 0.1,
        },
        seed: 11,
        ..TableConfig::with_dim(8)
    };
    let keys: Vec<u64> = (0..500).map(|k| k * 7919).collect();
    let mut rev = keys.clone();
    rev.reverse();
    let mut a = table(cfg.clone());
    let mut b = EmbeddingShard::new(3, 8, &[(TableName::new("t"), cfg)], None).unwrap();
    let ra = train_lookup(&mut a, &keys, 0);
    let mut rb = Vec::new();
    b.table_mut(&TableName::new("t"))
        .unwrap()
        .lookup_for_training(&rev, &TrainCtx::default(), &mut rb)
        .unwrap();
    for (i, _) in keys.iter().enumerate() {
        let j = keys.len() - 1 - i;
        assert_eq!(&ra[i * 8..(i + 1) * 8], &rb[j * 8..(j + 1) * 8]);
    }
}

#[test]
fn bad_gradients_are_refused_and_never_touch_a_row() {
    let mut t = table(TableConfig::with_dim(4));
    train_lookup(&mut t, &[1, 2, 3], 0);
    let before = lookup(&mut t, &[1, 2, 3]);
    let v0 = t.version();
    let err = t.apply_gradients(&[1, 2], &[0.1; 7], &TrainCtx::default());
    assert!(
        matches!(err, Err(EmbeddingError::GradientShape { got: 7, .. })),
        "{err:?}"
    );
    assert_eq!(lookup(&mut t, &[1, 2, 3]), before);
    assert_eq!(t.version(), v0);

    // NaN for key 1, inf for key 2, a finite gradient that overflows Adagrad's accumulator
    // for key 3 (1e30² = inf), and a good one for a key without a row.
    let mut g = vec![0.0; 16];
    g[0] = f32::NAN;
    g[5] = f32::INFINITY;
    g[8..12].fill(1e30);
    g[12..16].fill(0.1);
    let rep = t
        .apply_gradients(&[1, 2, 3, 99], &g, &TrainCtx::default())
        .unwrap();
    assert_eq!(rep.rejected_non_finite, 3);
    assert_eq!(rep.without_row, 1);
    assert_eq!(rep.applied, 0);
    assert_eq!(lookup(&mut t, &[1, 2, 3]), before);
    assert_eq!(t.stats().rejected_gradients, 3);
    assert_eq!(t.version(), v0, "a refused update is not a change");

    let shard = EmbeddingShard::new(
        0,
        1,
        &[(TableName::new("t"), TableConfig::with_dim(4))],
        None,
    )
    .unwrap();
    assert!(matches!(
        shard.table(&TableName::new("nope")),
        Err(EmbeddingError::UnknownTable(_))
    ));
}

#[test]
fn duplicate_keys_in_a_batch_are_summed_first() {
    let mut a = table(TableConfig::with_dim(2));
    let mut b = table(TableConfig::with_dim(2));
    train_lookup(&mut a, &[5, 6], 0);
    train_lookup(&mut b, &[5, 6], 0);
    let rep = a
        .apply_gradients(
            &[5, 6, 5],
            &[0.1, 0.2, 1.0, 1.0, 0.3, -0.4],
            &TrainCtx::default(),
        )
        .unwrap();
    assert_eq!(rep.merged_duplicates, 1);
    assert_eq!(rep.applied, 2);
    b.apply_gradients(
        &[5, 6],
        &[0.1 + 0.3, 0.2 - 0.4, 1.0, 1.0],
        &TrainCtx::default(),
    )
    .unwrap();
    assert_eq!(lookup(&mut a, &[5, 6]), lookup(&mut b, &[5, 6]));
}

/// The push skips its duplicate check when the training lookup of the same keys proved them
/// unique. Here the rows exist already, so the lookup creates none and only its stamp pass can
/// see the repeated key: the push must still fold it.
#[test]
fn a_repeat_in_a_training_lookup_still_folds_its_push() {
    let mut a = table(TableConfig::with_dim(2));
    let mut b = table(TableConfig::with_dim(2));
    train_lookup(&mut a, &[5, 6], 0);
    train_lookup(&mut b, &[5, 6], 0);
    let ctx = TrainCtx::at_step(1);
    train_lookup(&mut a, &[5, 6, 5], 1);
    let rep = a
        .apply_gradients(&[5, 6, 5], &[0.1, 0.2, 1.0, 1.0, 0.3, -0.4], &ctx)
        .unwrap();
    assert_eq!(rep.merged_duplicates, 1);
    assert_eq!(rep.applied, 2);
    train_lookup(&mut b, &[5, 6], 1);
    let rep = b
        .apply_gradients(&[5, 6], &[0.1 + 0.3, 0.2 - 0.4, 1.0, 1.0], &ctx)
        .unwrap();
    assert_eq!(rep.merged_duplicates, 0);
    assert_eq!(lookup(&mut a, &[5, 6]), lookup(&mut b, &[5, 6]));
}

/// The reference: a HashMap of rows, counter admission, the same optimizer kernel.
struct Reference {
    rows: HashMap<u64, Vec<f32>>,
    pending: HashMap<u64, u32>,
    min_count: u32,
    cfg: TableConfig,
    seed: u64,
}

impl Reference {
    fn lookup(&self, keys: &[u64]) -> Vec<f32> {
        let d = self.cfg.dim;
        keys.iter()
            .flat_map(|k| {
                self.rows
                    .get(k)
                    .map(|r| r[..d].to_vec())
                    .unwrap_or(vec![self.cfg.default_value; d])
            })
            .collect()
    }

    fn train_lookup(&mut self, keys: &[u64]) -> Vec<f32> {
        for &k in keys {
            if self.rows.contains_key(&k) {
                continue;
            }
            let c = self.pending.entry(k).or_default();
            *c += 1;
            if *c >= self.min_count {
                self.pending.remove(&k);
                let d = self.cfg.dim;
                let mut r = vec![0.0; d + self.cfg.optimizer.state_floats(d)];
                optimizer::init_row(&mut r, d, &self.cfg.init, &self.cfg.optimizer, self.seed, k);
                self.rows.insert(k, r);
            }
        }
        self.lookup(keys)
    }

    fn apply(&mut self, keys: &[u64], grads: &[f32]) {
        let d = self.cfg.dim;
        let mut summed: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
        let mut order = Vec::new();
        for (i, &k) in keys.iter().enumerate() {
            let e = summed.entry(k).or_insert_with(|| {
                order.push(k);
                vec![0.0; d]
            });
            for (a, b) in e.iter_mut().zip(&grads[i * d..(i + 1) * d]) {
                *a += b;
            }
        }
        for k in order {
            if let Some(r) = self.rows.get_mut(&k) {
                optimizer::apply(r, d, &summed[&k], &self.cfg.optimizer);
            }
        }
    }
}

#[test]
fn table_matches_reference_model_under_random_operations() {
    let seed = crate::testkit::seed("table_matches_reference");
    let mut rng = Xoshiro256::seed_from_u64(seed);
    for opt in [
        OptimizerConfig::Sgd { lr: 0.1 },
        OptimizerConfig::default(),
        OptimizerConfig::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
        },
        OptimizerConfig::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.0,
            l2: 0.01,
        },
    ] {
        let min_count = 1 + rng.below(3) as u32;
        let cfg = TableConfig {
            dim: 1 + rng.below(9) as usize,
            optimizer: opt,
            admission: AdmissionConfig::Counter { min_count },
            init: Initializer::Uniform { scale: 0.05 },
            default_value: 0.25,
            ..TableConfig::default()
        };
        let mut t = table(cfg.clone());
        let mut r = Reference {
            rows: HashMap::new(),
            pending: HashMap::new(),
            min_count,
            seed: mix64(cfg.seed ^ fnv1a(b"t")),
            cfg: cfg.clone(),
        };
        let d = cfg.dim;
        for step in 0..300u64 {
            let n = 1 + rng.below(64) as usize;
            let keys: Vec<u64> = (0..n).map(|_| rng.below(400) * 0x9e37_79b9).collect();
            match rng.below(10) {
                0 => {
                    let (got, want) = (lookup(&mut t, &keys), r.lookup(&keys));
                    assert_eq!(
                        got.len(),
                        want.len(),
                        "seed {seed} step {step} keys {keys:?}"
                    );
                    let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
                    assert!(
                        diff.is_empty(),
                        "seed {seed} step {step} {}: differ at {diff:?} of {}: {:?} vs {:?}",
                        cfg.optimizer.name(),
                        got.len(),
                        diff.first().map(|&i| got[i]),
                        diff.first().map(|&i| want[i])
                    );
                }
                1 => {
                    let del: Vec<u64> = keys.iter().take(3).copied().collect();
                    let mut uniq = del.clone();
                    uniq.sort_unstable();
                    uniq.dedup();
                    let want = uniq.iter().filter(|k| r.rows.remove(k).is_some()).count();
                    assert_eq!(t.delete(&uniq).unwrap(), want as u64);
                }
                _ => {
                    let got = train_lookup(&mut t, &keys, step);
                    assert_eq!(got, r.train_lookup(&keys), "seed {seed} step {step}");
                    let grads: Vec<f32> = (0..n * d)
                        .map(|_| (rng.next_normal() * 0.5) as f32)
                        .collect();
                    t.apply_gradients(&keys, &grads, &TrainCtx::at_step(step))
                        .unwrap();
                    r.apply(&keys, &grads);
                }
            }
        }
        assert_eq!(t.len() as usize, r.rows.len(), "seed {seed}");
        let snap = t.snapshot().unwrap();
        for (k, row) in snap.rows_by_key() {
            assert_eq!(row, &r.rows[&k][..], "seed {seed} key {k}");
        }
        assert_eq!(t.stats().pending_admission as usize, r.pending.len());
    }
}

#[test]
fn idle_rows_are_evicted_within_one_sweep_and_active_rows_stay() {
    let cfg = TableConfig {
        eviction: EvictionConfig {
            max_idle_steps: Some(10),
            max_idle_secs: Some(100),
            sweep_rows_per_call: 64,
            ..EvictionConfig::default()
        },
        ..TableConfig::with_dim(2)
    };
    let mut t = table(cfg);
    let all: Vec<u64> = (0..1000).collect();
    let ctx = |step, secs: u64| TrainCtx {
        step,
        now_ms: secs * 1000,
    };
    let mut out = Vec::new();
    t.lookup_for_training(&all, &ctx(0, 0), &mut out).unwrap();
    let active: Vec<u64> = (0..100).collect();
    // 1000 rows at 64 per call: 16 calls sweep everything. Keep 0..100 updated.
    for step in 1..=40 {
        t.lookup_for_training(&active, &ctx(step, 0), &mut out)
            .unwrap();
        t.apply_gradients(&active, &vec![0.01; 200], &ctx(step, 0))
            .unwrap();
    }
    assert_eq!(t.keys(), active, "idle rows evicted, active rows kept");
    assert_eq!(t.stats().evicted_idle_steps, 900);
    // Now by time: no step passes, but 200 s do.
    for i in 0..20 {
        t.apply_gradients(&[], &[], &ctx(40, 200 + i)).unwrap();
    }
    assert!(t.is_empty());
    assert_eq!(t.stats().evicted_idle_secs, 100);
}

#[test]
fn capacity_eviction_keeps_the_limit_and_prefers_cold_rows() {
    for policy in [CapacityPolicy::Lru, CapacityPolicy::Lfu] {
        let cfg = TableConfig {
            eviction: EvictionConfig {
                capacity: Some(200),
                capacity_policy: policy,
                ..EvictionConfig::default()
            },
            ..TableConfig::with_dim(2)
        };
        let mut t = table(cfg);
        let hot: Vec<u64> = (0..50).collect();
        for step in 0..300u64 {
            // Hot keys every step; a stream of fresh keys that each appear once.
            let mut keys = hot.clone();
            keys.extend((0..20).map(|i| 1_000_000 + step * 20 + i));
            train_lookup(&mut t, &keys, step);
            assert!(t.len() <= 200, "{policy:?} exceeded capacity: {}", t.len());
        }
        let kept = t.keys();
        let hot_kept = hot.iter().filter(|k| kept.binary_search(k).is_ok()).count();
        assert!(
            hot_kept >= 48,
            "{policy:?} kept only {hot_kept} of 50 hot keys"
        );
        assert!(t.stats().evicted_capacity > 5000);
    }
}

#[test]
fn l2_floor_evicts_rows_that_ftrl_zeroes() {
    let cfg = TableConfig {
        optimizer: OptimizerConfig::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 10.0,
            l2: 0.0,
        },
        eviction: EvictionConfig {
            min_l2_norm: Some(1e-6),
            ..EvictionConfig::default()
        },
        init: Initializer::Zeros,
        ..TableConfig::with_dim(4)
    };
    let mut t = table(cfg);
    train_lookup(&mut t, &[1, 2], 0);
    // A big l1 drives every weight to exactly zero after one small update.
    t.apply_gradients(&[1, 2], &[0.01; 8], &TrainCtx::at_step(1))
        .unwrap();
    assert!(t.is_empty());
    assert_eq!(t.stats().evicted_l2, 2);
    let ch = t.changes_since(0).unwrap();
    let mut tomb = ch.tombstones.clone();
    tomb.sort_unstable();
    assert_eq!(tomb, vec![1, 2]);
}

/// Runs a random workload, checking after each call that the changes since each earlier
/// version turn that version's snapshot into the current one.
#[test]
fn changes_since_turns_any_earlier_snapshot_into_the_current_one() {
    let seed = crate::testkit::seed("changes_since_vs_snapshots");
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let cfg = TableConfig {
        eviction: EvictionConfig {
            capacity: Some(150),
            max_idle_steps: Some(30),
            sweep_rows_per_call: 16,
            ..EvictionConfig::default()
        },
        admission: AdmissionConfig::Counter { min_count: 2 },
        ..TableConfig::with_dim(3)
    };
    let mut t = table(cfg);
    let mut history: Vec<(u64, BTreeMap<u64, Vec<f32>>)> = Vec::new();
    for step in 0..200u64 {
        let keys: Vec<u64> = (0..1 + rng.below(40)).map(|_| rng.below(300)).collect();
        train_lookup(&mut t, &keys, step);
        let grads: Vec<f32> = (0..keys.len() * 3).map(|_| rng.next_f32() - 0.5).collect();
        t.apply_gradients(&keys, &grads, &TrainCtx::at_step(step))
            .unwrap();
        if rng.below(8) == 0 {
            t.delete(&[rng.below(300)]).unwrap();
        }
        let rf = t.row_floats();
        let now: BTreeMap<u64, Vec<f32>> = t
            .snapshot()
            .unwrap()
            .rows_by_key()
            .into_iter()
            .map(|(k, r)| (k, r.to_vec()))
            .collect();
        for (v, then) in history.iter().step_by(7) {
            let ch = t.changes_since(*v).unwrap();
            let mut rebuilt = then.clone();
            for k in &ch.tombstones {
                rebuilt.remove(k);
            }
            for i in 0..ch.upserts.len() {
                rebuilt.insert(ch.upserts.keys[i], ch.upserts.row(i, rf).to_vec());
            }
            assert_eq!(rebuilt, now, "seed {seed} step {step} since {v}");
            assert_eq!(ch.version, t.version());
        }
        history.push((t.version(), now));
    }
    // The log stays proportional to the table, not to the number of updates.
    assert!(t.changes.len() <= 2 * (t.len() as usize + t.tombstones.len()) + 4096);
}

#[test]
fn changes_since_costs_changes_not_table_size() {
    let mut t = table(TableConfig::with_dim(4));
    let keys: Vec<u64> = (0..100_000).collect();
    train_lookup(&mut t, &keys, 0);
    let v = t.version();
    t.apply_gradients(&[7, 8], &[0.1; 8], &TrainCtx::at_step(1))
        .unwrap();
    // The first query seals the log at v; later ones scan only what came after.
    assert_eq!(t.changes_since(v).unwrap().upserts.keys, vec![7, 8]);
    let v = t.version();
    for step in 1..50 {
        t.apply_gradients(&[7, 8], &[0.1; 8], &TrainCtx::at_step(step))
            .unwrap();
    }
    assert!(
        t.changes.len() <= 100_000 + 2,
        "repeated updates of a row add no entries"
    );
    let start = t.changes.partition_point(|&(ver, _)| ver <= v);
    assert_eq!(
        t.changes.len() - start,
        2,
        "only the two changed rows are examined"
    );
    let ch = t.changes_since(v).unwrap();
    assert_eq!(ch.upserts.keys, vec![7, 8]);
    t.forget_changes_through(t.version());
    assert!(matches!(
        t.changes_since(v),
        Err(EmbeddingError::ChangesCompacted { .. })
    ));
}

/// The same random workload, with and without a tier that holds a fifth of the rows.
fn tier_workload(
    seed: u64,
    dir: Option<&std::path::Path>,
) -> (Vec<Vec<f32>>, TableSnapshot, TableStats) {
    tier_workload_reserving(seed, dir, 0)
}

fn tier_workload_reserving(
    seed: u64,
    dir: Option<&std::path::Path>,
    reserve_rows: u64,
) -> (Vec<Vec<f32>>, TableSnapshot, TableStats) {
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let mut cfg = TableConfig {
        optimizer: OptimizerConfig::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        eviction: EvictionConfig {
            capacity: Some(3_000),
            capacity_policy: CapacityPolicy::Lfu,
            max_idle_steps: Some(150),
            sweep_rows_per_call: 32,
            ..EvictionConfig::default()
        },
        admission: AdmissionConfig::Probability { p: 0.5 },
        ..TableConfig::with_dim(8)
    };
    // Adam dim 8 = 26 floats, padded to 128 bytes; +8 per slot: ~600 rows of budget.
    cfg.dram_budget_bytes = dir.map(|_| 600 * 136);
    cfg.reserve_rows = reserve_rows;
    let mut t = Table::new(TableName::new("t"), cfg, dir).unwrap();
    let zipf = crate::rng::Zipf::new(5_000, 1.05);
    let mut outs = Vec::new();
    for step in 0..400u64 {
        let keys: Vec<u64> = (0..64).map(|_| zipf.sample(&mut rng) * 31).collect();
        let mut out = Vec::new();
        t.lookup_for_training(&keys, &TrainCtx::at_step(step), &mut out)
            .unwrap();
        outs.push(out);
        let grads: Vec<f32> = (0..keys.len() * 8).map(|_| rng.next_f32() - 0.5).collect();
        t.apply_gradients(&keys, &grads, &TrainCtx::at_step(step))
            .unwrap();
        if step % 50 == 0 {
            t.delete(&[31, 62]).unwrap();
        }
    }
    let stats = t.stats();
    (outs, t.snapshot().unwrap(), stats)
}

#[test]
fn tiering_gives_identical_results() {
    let seed = crate::testkit::seed("tiering_identical");
    let dir = tempfile::tempdir().unwrap();
    let (a_out, a_snap, a_stats) = tier_workload(seed, None);
    let (b_out, b_snap, b_stats) = tier_workload(seed, Some(dir.path()));
    assert!(b_stats.cold_rows > 500, "the tier was used: {b_stats:?}");
    assert!(b_stats.tier_hit_rate() < 1.0 && b_stats.tier_misses > 0);
    assert_eq!(a_out, b_out, "seed {seed}: lookups differ with tiering");
    // Everything but the tier's own counters must match.
    let strip = |mut s: TableSnapshot| {
        s.stats.tier_hits = 0;
        s.stats.tier_misses = 0;
        s
    };
    assert_eq!(strip(a_snap), strip(b_snap), "seed {seed}");
    assert_eq!(a_stats.rows, b_stats.rows);
}

/// A reservation only moves allocation earlier: below it, past it (the workload keeps about
/// 3,000 rows), and beyond a tier's DRAM budget, the table computes exactly what a table
/// that grows from empty computes.
#[test]
fn reserved_tables_compute_what_growing_tables_compute() {
    let seed = crate::testkit::seed("reserve_rows");
    let dir = tempfile::tempdir().unwrap();
    let memory = |mut s: TableSnapshot| {
        s.stats.hot_bytes = 0;
        s.stats.index_bytes = 0;
        s
    };
    let (out, snap, stats) = tier_workload(seed, None);
    for reserve in [1_000, 20_000] {
        let (r_out, r_snap, r_stats) = tier_workload_reserving(seed, None, reserve);
        assert_eq!(
            out, r_out,
            "seed {seed}: lookups differ with reserve {reserve}"
        );
        assert_eq!(memory(snap.clone()), memory(r_snap), "seed {seed}");
        assert!(r_stats.index_bytes >= stats.index_bytes);
        if reserve == 20_000 {
            // Room for 20,000 keys at the index's load limit, where the table alone grew
            // to what its ~3,000 rows need.
            assert!(r_stats.index_bytes >= 20_000 * 16, "{r_stats:?}");
            assert!(stats.index_bytes < 20_000 * 16, "{stats:?}");
        }
    }
    let (t_out, t_snap, _) = tier_workload(seed, Some(dir.path()));
    let dir2 = tempfile::tempdir().unwrap();
    let (rt_out, rt_snap, rt_stats) = tier_workload_reserving(seed, Some(dir2.path()), 200_000);
    assert_eq!(
        t_out, rt_out,
        "seed {seed}: tiered lookups differ with a reserve"
    );
    assert_eq!(memory(t_snap), memory(rt_snap), "seed {seed}");
    // The hot slots reserved stop at the budget (600 rows): one 8 MiB arena chunk of rows and
    // one of metadata, where 200,000 rows of 128 bytes would have taken four chunks.
    assert!(rt_stats.hot_bytes <= 16 << 20, "{rt_stats:?}");
}

#[test]
fn snapshot_restore_is_bit_identical_and_continues_identically() {
    let seed = crate::testkit::seed("snapshot_restore");
    let dir = tempfile::tempdir().unwrap();
    for tiered in [false, true] {
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let cfg = TableConfig {
            admission: AdmissionConfig::CountingBloom {
                min_count: 2,
                false_positive_rate: 0.01,
                expected_keys: 1000,
            },
            eviction: EvictionConfig {
                capacity: Some(400),
                ..EvictionConfig::default()
            },
            dram_budget_bytes: tiered.then_some(100 * 136),
            ..TableConfig::with_dim(8)
        };
        let mut a = Table::new(TableName::new("t"), cfg.clone(), Some(dir.path())).unwrap();
        let work = |t: &mut Table, rng: &mut Xoshiro256, step: u64| {
            let keys: Vec<u64> = (0..50).map(|_| rng.below(1000)).collect();
            let mut out = Vec::new();
            t.lookup_for_training(&keys, &TrainCtx::at_step(step), &mut out)
                .unwrap();
            let grads: Vec<f32> = (0..keys.len() * 8).map(|_| rng.next_f32() - 0.5).collect();
            t.apply_gradients(&keys, &grads, &TrainCtx::at_step(step))
                .unwrap();
            out
        };
        for step in 0..100 {
            work(&mut a, &mut rng, step);
        }
        let snap = a.snapshot().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let mut b = Table::new(TableName::new("t"), cfg.clone(), Some(other_dir.path())).unwrap();
        b.restore(snap.clone()).unwrap();
        let mut snap_b = b.snapshot().unwrap();
        let mut snap_a = snap.clone();
        for s in [&mut snap_a, &mut snap_b] {
            s.stats.tier_hits = 0;
            s.stats.tier_misses = 0;
        }
        assert_eq!(snap_a, snap_b, "seed {seed} tiered {tiered}");
        // Both continue with the same inputs and stay identical.
        let mut rng_b = rng.clone();
        for step in 100..150 {
            assert_eq!(
                work(&mut a, &mut rng, step),
                work(&mut b, &mut rng_b, step),
                "seed {seed}"
            );
        }
        // Restore refuses a snapshot of another shape, and leaves the table as it was.
        let mut wrong = snap.clone();
        wrong.rows.data.pop();
        let before = b.snapshot().unwrap().rows_by_key().len();
        assert!(matches!(
            b.restore(wrong),
            Err(EmbeddingError::SnapshotMismatch { .. })
        ));
        assert_eq!(b.snapshot().unwrap().rows_by_key().len(), before);
        // Row-id bookkeeping from disk is checked, not trusted.
        if let Some(&live) = snap.rows.row_ids.first() {
            let mut freed_live = snap.clone();
            freed_live.free_rows.push(live);
            assert!(
                b.restore(freed_live).is_err(),
                "a live row id listed as free"
            );
            let mut dup_id = snap.clone();
            dup_id.rows.row_ids[1] = dup_id.rows.row_ids[0];
            assert!(b.restore(dup_id).is_err(), "two rows with one id");
            let mut hole = snap.clone();
            hole.next_row += 1;
            assert!(b.restore(hole).is_err(), "a row id neither live nor free");
        }
        let mut other = Table::new(TableName::new("t"), TableConfig::with_dim(4), None).unwrap();
        assert!(other.restore(snap).is_err());
    }
}

#[test]
fn shard_restore_checks_identity_and_tables() {
    let tables = [
        (TableName::new("a"), TableConfig::with_dim(2)),
        (TableName::new("b"), TableConfig::with_dim(3)),
    ];
    let mut s = EmbeddingShard::new(1, 4, &tables, None).unwrap();
    let mut out = Vec::new();
    s.table_mut(&TableName::new("a"))
        .unwrap()
        .lookup_for_training(&[1, 2], &TrainCtx::default(), &mut out)
        .unwrap();
    let snap = s.snapshot().unwrap();
    let mut other = EmbeddingShard::new(2, 4, &tables, None).unwrap();
    assert!(matches!(
        other.restore(snap.clone()),
        Err(EmbeddingError::WrongShard { .. })
    ));
    let mut fresh = EmbeddingShard::new(1, 4, &tables, None).unwrap();
    fresh.restore(snap.clone()).unwrap();
    assert_eq!(fresh.snapshot().unwrap(), snap);
    let mut missing = snap;
    missing.tables.pop();
    assert!(fresh.restore(missing).is_err());
}

/// The gradients for a batch reuse its training lookup's resolution; anything that moves a
/// row in between (a delete; a plain lookup re-resolves anyway) must force a new one.
/// Table `a` may reuse; table `b` is forced to resolve afresh before every apply (an empty
/// lookup clears the reuse). Their models must be identical.
#[test]
fn reused_resolution_equals_a_fresh_one() {
    let seed = crate::testkit::seed("reused_resolution");
    let dir = tempfile::tempdir().unwrap();
    let cfg = TableConfig {
        eviction: EvictionConfig {
            capacity: Some(300),
            ..EvictionConfig::default()
        },
        dram_budget_bytes: Some(100 * 136),
        ..TableConfig::with_dim(8)
    };
    let mut a = Table::new(
        TableName::new("t"),
        cfg.clone(),
        Some(&dir.path().join("a")),
    )
    .unwrap();
    let mut b = Table::new(TableName::new("t"), cfg, Some(&dir.path().join("b"))).unwrap();
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let mut out = Vec::new();
    for step in 0..300u64 {
        let mut keys: Vec<u64> = (0..40).map(|_| rng.below(600)).collect();
        keys.sort_unstable();
        keys.dedup();
        // Half the time delete a key of this very batch, between its lookup and its update.
        let del = if rng.below(2) == 0 {
            keys[rng.below(keys.len() as u64) as usize]
        } else {
            rng.below(600)
        };
        let breaker = rng.below(3) == 0;
        let grads: Vec<f32> = (0..keys.len() * 8).map(|_| rng.next_f32() - 0.5).collect();
        let ctx = TrainCtx::at_step(step);
        for (t, force_fresh) in [(&mut a, false), (&mut b, true)] {
            out.clear();
            t.lookup_for_training(&keys, &ctx, &mut out).unwrap();
            if breaker {
                t.delete(&[del]).unwrap();
            }
            if force_fresh {
                t.lookup(&[], &mut out).unwrap();
            }
            t.apply_gradients(&keys, &grads, &ctx).unwrap();
        }
    }
    let strip = |mut s: TableSnapshot| {
        s.stats.tier_hits = 0;
        s.stats.tier_misses = 0;
        s
    };
    let (sa, sb) = (strip(a.snapshot().unwrap()), strip(b.snapshot().unwrap()));
    assert!(
        a.stats().cold_rows > 0,
        "the tier moved rows during the test"
    );
    assert_eq!(sa, sb, "seed {seed}");
}

/// A refused restore opens (and drops) a second spill store beside the live one: the live
/// table's cold rows must stay readable and its tier keep working afterwards.
#[test]
fn a_refused_restore_leaves_a_tiered_table_working() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TableConfig {
        dram_budget_bytes: Some(50 * 136),
        ..TableConfig::with_dim(8)
    };
    let mut t = Table::new(TableName::new("t"), cfg, Some(dir.path())).unwrap();
    // Enough cold rows (80 B records) to fill several 4 MiB segments.
    let keys: Vec<u64> = (0..150_000).collect();
    for c in keys.chunks(1000) {
        train_lookup(&mut t, c, 0);
    }
    assert!(t.stats().cold_rows > 140_000);
    let before = t.snapshot().unwrap();
    let mut bad = before.clone();
    bad.rows.keys[1] = bad.rows.keys[0]; // a duplicate key: refused after the store opened
    assert!(matches!(
        t.restore(bad),
        Err(EmbeddingError::SnapshotMismatch { .. })
    ));
    // Every row, hot or cold, still reads back, and the tier still promotes and demotes.
    assert_eq!(t.snapshot().unwrap(), before);
    for c in keys.chunks(1000) {
        t.apply_gradients(c, &vec![0.01; c.len() * 8], &TrainCtx::at_step(1))
            .unwrap();
    }
    assert_eq!(t.stats().rows, 150_000);
}

/// Eviction at the end of `lookup_for_training` spares the rows the step just looked up
/// (capacity sampling and the idle sweep both skip them), so the following `apply_gradients`
/// always finds its rows; capacity is restored at the next step. Snapshots stay consistent
/// throughout: no row id is live without its key in the index.
#[test]
fn eviction_spares_the_current_batch_and_catches_up_next_step() {
    let cfg = TableConfig {
        eviction: EvictionConfig {
            capacity: Some(1),
            max_idle_steps: Some(0),
            ..EvictionConfig::default()
        },
        optimizer: OptimizerConfig::Sgd { lr: 1.0 },
        ..TableConfig::with_dim(2)
    };
    let mut t = table(cfg);
    train_lookup(&mut t, &[10, 11], 1);
    assert_eq!(t.len(), 2, "both rows are in use by step 1");
    let rep = t
        .apply_gradients(&[10, 11], &[1.0, 1.0, 2.0, 2.0], &TrainCtx::at_step(1))
        .unwrap();
    assert_eq!((rep.applied, rep.without_row), (2, 0));
    assert_eq!(t.snapshot().unwrap().rows.keys.len(), 2);
    train_lookup(&mut t, &[12], 3);
    assert_eq!(t.len(), 1, "step 3 evicts the idle rows down to capacity");
    let rep = t
        .apply_gradients(&[12], &[1.0, 1.0], &TrainCtx::at_step(3))
        .unwrap();
    assert_eq!(rep.applied, 1);
    assert_eq!(t.snapshot().unwrap().rows.keys, vec![12]);
}

/// The idle sweep never evicts a row that the current training step has just looked up.
#[test]
fn idle_sweep_spares_rows_of_the_current_step() {
    let cfg = TableConfig {
        eviction: EvictionConfig {
            max_idle_steps: Some(5),
            ..EvictionConfig::default()
        },
        ..TableConfig::with_dim(2)
    };
    let mut t = table(cfg);
    train_lookup(&mut t, &[1, 2], 0);
    train_lookup(&mut t, &[1], 10);
    assert_eq!(lookup(&mut t, &[2]), vec![0.0, 0.0], "idle key 2 is gone");
    let rep = t
        .apply_gradients(&[1], &[0.5, 0.5], &TrainCtx::at_step(10))
        .unwrap();
    assert_eq!(rep.applied, 1, "key 1 was in use and kept");
}

#[test]
fn all_finite_agrees_with_is_finite_on_every_class_of_value() {
    let specials = [
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        f32::MIN_POSITIVE / 2.0, // subnormal
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
    ];
    // Every length around the vector widths, with the special value at every position.
    for len in 1..=19 {
        for pos in 0..len {
            for &x in &specials {
                let mut v = vec![1.5f32; len];
                v[pos] = x;
                assert_eq!(
                    super::all_finite(&v),
                    v.iter().all(|x| x.is_finite()),
                    "len {len} pos {pos} value {x}"
                );
            }
        }
    }
    assert!(super::all_finite(&[]));
}

#[test]
fn hot_slots_are_as_small_as_their_lines_allow() {
    // Lines a slot of `bytes` touches at each start a stride of `stride` floats produces.
    let worst_lines = |stride: usize, bytes: usize| {
        (0..64)
            .map(|i| {
                let start = (i * stride * 4) % 64;
                (start + bytes).div_ceil(64)
            })
            .max()
            .unwrap_or(0)
    };
    for floats in 1..=300 {
        let bytes = floats * 4;
        let s = padded_stride(floats);
        assert!(s >= floats, "{floats} floats in a slot of {s}");
        assert_eq!(
            worst_lines(s, bytes),
            bytes.div_ceil(64),
            "{floats} floats at stride {s} straddle an extra line"
        );
        assert!(
            (floats..s).all(|t| worst_lines(t, bytes) > bytes.div_ceil(64)),
            "{floats} floats: a stride below {s} would do"
        );
    }
    // Wide & Deep's and DeepFM's rows: 16 + 1 weights with their Adagrad accumulators.
    assert_eq!(padded_stride(34), 34);
    assert_eq!(padded_stride(32), 32);
}

/// Plain lookups copy each row out as they resolve it, and copy cold rows once promoted. One
/// that fails part-way through its batch (here on spill records damaged on disk) leaves the
/// caller's output exactly as it was: the weights of the keys resolved before the failure
/// must not be left behind in it.
#[test]
fn a_failed_lookup_leaves_the_output_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TableConfig::with_dim(8);
    cfg.dram_budget_bytes = Some(1_000 * Table::hot_slot_bytes(&cfg) as u64);
    let mut t = Table::new(TableName::new("t"), cfg.clone(), Some(dir.path())).unwrap();
    cfg.dram_budget_bytes = None;
    let mut all_dram = table(cfg);
    let keys: Vec<u64> = (1..=40_000).collect();
    for chunk in keys.chunks(200) {
        train_lookup(&mut t, chunk, 0);
        train_lookup(&mut all_dram, chunk, 0);
    }
    assert!(t.stats().cold_rows > 35_000, "{:?}", t.stats());
    // A plain lookup of hot and cold rows together reads what an all-DRAM table reads.
    let mixed: Vec<u64> = keys[39_990..]
        .iter()
        .chain(&keys[200..260])
        .copied()
        .collect();
    assert_eq!(lookup(&mut t, &mixed), lookup(&mut all_dram, &mixed));
    assert!(t.stats().tier_misses >= 60, "{:?}", t.stats());
    let hot_then_cold: Vec<u64> = keys[39_990..].iter().chain(&keys[..50]).copied().collect();
    let before = lookup(&mut t, &keys[39_990..]);
    fn damage_segments(dir: &std::path::Path) -> usize {
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                n += damage_segments(&path);
            } else if path.extension().is_some_and(|e| e == "seg") {
                let len = std::fs::metadata(&path).unwrap().len() as usize;
                std::fs::write(&path, vec![0xab; len]).unwrap();
                n += 1;
            }
        }
        n
    }
    assert!(damage_segments(dir.path()) > 0);
    // The oldest rows were demoted first, so the first 50 keys are on disk by now (their
    // records left the store's 1 MiB write buffer long ago).
    for train in [false, true] {
        let mut out = vec![7.0; 3];
        let r = if train {
            t.lookup_for_training(&hot_then_cold, &TrainCtx::at_step(1), &mut out)
        } else {
            t.lookup(&hot_then_cold, &mut out)
        };
        assert!(
            matches!(r, Err(EmbeddingError::Tier { .. })),
            "train {train}: {r:?}"
        );
        assert_eq!(out, [7.0; 3], "train {train}");
    }
    // The hot rows still read as they did.
    let mut out = Vec::new();
    t.lookup(&keys[39_990..], &mut out).unwrap();
    assert_eq!(out, before);
}
