use std::collections::BTreeMap;

use super::writer::{CheckpointHandle, Schedule, StepBoundary, WriterArgs};
use super::*;
use crate::dense::{DenseNet, DenseState, InputShape, ModelConfig, ModelKind};
use crate::embedding::{
    AdmissionConfig, CapacityPolicy, EmbeddingShard, EvictionConfig, OptimizerConfig,
    ShardSnapshot, TrainCtx,
};
use crate::fault::Faults;
use crate::rng::Xoshiro256;
use crate::routing::shard_of;
use crate::shard::{ShardArgs, ShardError, ShardHandle, ShardRouter};

fn tables() -> Vec<(TableName, TableConfig)> {
    let evicting = TableConfig {
        eviction: EvictionConfig {
            max_idle_steps: Some(6),
            capacity: Some(150),
            capacity_policy: CapacityPolicy::Lru,
            sweep_rows_per_call: 32,
            ..EvictionConfig::default()
        },
        admission: AdmissionConfig::Counter { min_count: 2 },
        optimizer: OptimizerConfig::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-10,
        },
        ..TableConfig::with_dim(4)
    };
    let bloom = TableConfig {
        admission: AdmissionConfig::CountingBloom {
            min_count: 2,
            false_positive_rate: 0.01,
            expected_keys: 1000,
        },
        ..TableConfig::with_dim(3)
    };
    vec![
        (TableName::new("a"), evicting),
        (TableName::new("b"), bloom),
    ]
}

fn dense(seed: u64) -> DenseState {
    let mut cfg = ModelConfig::new(ModelKind::Lr);
    cfg.seed = seed;
    DenseNet::new(
        cfg,
        InputShape {
            fields: vec![0],
            dense: 2,
        },
    )
    .unwrap()
    .state()
}

fn meta(step: u64) -> VersionMeta {
    VersionMeta {
        step,
        rows_trained: step * 10,
        samples_rejected: 0,
        replays: Vec::new(),
        calibrated_from: None,
        sample_offsets: BTreeMap::from([(0, step * 10), (1, step * 7)]),
        joiner_offsets: BTreeMap::from([("impressions".into(), BTreeMap::from([(0, step)]))]),
        model: ModelConfig::new(ModelKind::Lr),
        schema: crate::sample::Schema::criteo(4),
        tables: tables()
            .into_iter()
            .map(|(n, c)| (n.to_string(), c))
            .collect(),
        placement: None,
    }
}

fn shards(n: u32) -> Vec<EmbeddingShard> {
    (0..n)
        .map(|s| EmbeddingShard::new(s, n, &tables(), None).unwrap())
        .collect()
}

/// One training step on every shard: Zipf-ish keys, lookups then gradients.
fn train_step(shards: &mut [EmbeddingShard], rng: &mut Xoshiro256, step: u64) {
    let n = shards.len() as u32;
    for (name, cfg) in tables() {
        let keys: Vec<u64> = (0..60)
            .map(|_| {
                let r = rng.next_f64();
                (r * r * 400.0) as u64
            })
            .collect();
        for s in 0..n {
            let mine: Vec<u64> = keys
                .iter()
                .copied()
                .filter(|&k| shard_of(k, n) == s)
                .collect();
            let t = shards[s as usize].table_mut(&name).unwrap();
            let ctx = TrainCtx {
                step,
                now_ms: 1_000_000 + step * 1000,
            };
            let mut out = Vec::new();
            t.lookup_for_training(&mine, &ctx, &mut out).unwrap();
            let grads: Vec<f32> = (0..mine.len() * cfg.dim)
                .map(|_| rng.next_f32() - 0.5)
                .collect();
            t.apply_gradients(&mine, &grads, &ctx).unwrap();
        }
    }
}

fn snap_all(shards: &mut [EmbeddingShard]) -> Vec<ShardSnapshot> {
    shards.iter_mut().map(|s| s.snapshot().unwrap()).collect()
}

/// Per shard, per table: the table version.
type TableVersions = Vec<Vec<(TableName, u64)>>;

fn versions_of(snaps: &[ShardSnapshot]) -> TableVersions {
    snaps.iter().map(ShardSnapshot::table_versions).collect()
}

/// Trains 4 shards for 40 steps, writing a full version at step 10 and deltas every 5
/// steps after it; returns the store and, per version, the exact in-memory state.
fn write_chain(
    root: &std::path::Path,
    seed: u64,
) -> (ModelStore, BTreeMap<u64, Vec<ShardSnapshot>>) {
    let store = ModelStore::open(root).unwrap();
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let mut sh = shards(4);
    let mut truth = BTreeMap::new();
    let mut since: Option<(u64, TableVersions)> = None;
    for step in 1..=40 {
        train_step(&mut sh, &mut rng, step);
        if step < 10 || step % 5 != 0 {
            continue;
        }
        let now = snap_all(&mut sh);
        let payload = match &since {
            None => Payload::Full(now.clone()),
            Some((parent, v)) => Payload::Delta {
                parent: *parent,
                shards: sh
                    .iter_mut()
                    .zip(v)
                    .map(|(s, v)| s.delta_since(v).unwrap())
                    .collect(),
            },
        };
        let m = store.write(meta(step), &dense(step), &payload).unwrap();
        since = Some((m.version, versions_of(&now)));
        truth.insert(m.version, now);
    }
    (store, truth)
}

#[test]
fn restore_of_every_version_is_bit_identical() {
    let seed = crate::testkit::seed("restore_of_every_version_is_bit_identical");
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), seed);
    assert_eq!(
        store.versions().unwrap(),
        truth.keys().copied().collect::<Vec<_>>()
    );
    let evicted: u64 = truth
        .values()
        .last()
        .unwrap()
        .iter()
        .map(|s| s.tables[0].stats.evicted())
        .sum();
    assert!(evicted > 0, "the chain must cover evictions (tombstones)");
    for (&v, want) in &truth {
        let r = store.restore(v, None).unwrap();
        assert_eq!(&r.shards, want, "version {v} (seed {seed})");
        let m = &r.manifest;
        assert_eq!(m.version, v);
        assert_eq!(r.dense, dense(m.step));
        assert_eq!(m.sample_offsets, meta(m.step).sample_offsets);
        assert_eq!(m.joiner_offsets, meta(m.step).joiner_offsets);
        // And the restored state is accepted by live shards.
        for (s, snap) in shards(4).iter_mut().zip(r.shards) {
            s.restore(snap).unwrap();
        }
    }
    let last = store.manifest(*truth.keys().last().unwrap()).unwrap();
    assert_eq!(last.kind, VersionKind::Delta);
    assert_eq!(last.base, 1);
}

#[test]
fn each_shard_restores_on_its_own() {
    let seed = crate::testkit::seed("each_shard_restores_on_its_own");
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), seed);
    for (&v, want) in truth.iter().rev().take(2) {
        let (m, d) = store.restore_dense(v).unwrap();
        assert_eq!((m.version, &d), (v, &dense(m.step)));
        for (i, w) in want.iter().enumerate() {
            let (snap, bytes) = store.restore_shard(v, i as u32, 4).unwrap();
            assert_eq!(&snap, w, "version {v} shard {i} (seed {seed})");
            assert!(bytes > 0);
        }
        // Another count re-routes: the same as one whole restore into that count.
        let three = store.restore(v, Some(3)).unwrap().shards;
        for (i, w) in three.iter().enumerate() {
            assert_eq!(&store.restore_shard(v, i as u32, 3).unwrap().0, w);
        }
        assert!(store.restore_shard(v, 4, 4).is_err());
    }
    // One shard's corrupt file refuses that shard, named.
    let v = *truth.keys().last().unwrap();
    let path = store.version_dir(v).join("shard-2.delta.msgpack");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let e = store.restore_shard(v, 2, 4).unwrap_err().to_string();
    assert!(e.contains("shard-2.delta.msgpack"), "{e}");
    assert!(store.restore_shard(v, 1, 4).is_ok());
}

#[test]
fn shards_restored_straight_from_the_files_are_bit_identical() {
    let seed = crate::testkit::seed("shards_restored_straight_from_the_files_are_bit_identical");
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), seed);
    // The full version streams from its files; a delta takes the merge path; both must give
    // exactly the state that was written, and equal what `restore` gives.
    let full = *truth.keys().next().unwrap();
    let delta = *truth.keys().last().unwrap();
    assert_eq!(store.manifest(full).unwrap().kind, VersionKind::Full);
    for v in [full, delta] {
        let whole = store.restore(v, None).unwrap();
        for (i, mut live) in shards(4).into_iter().enumerate() {
            let bytes = store.restore_shard_into(v, &mut live).unwrap();
            assert!(bytes > 0);
            let got = live.snapshot().unwrap();
            assert_eq!(&got, &truth[&v][i], "version {v} shard {i} (seed {seed})");
            assert_eq!(&got, &whole.shards[i]);
        }
    }
    // Into another shard count the rows are re-routed, as `restore` does.
    let three = store.restore(full, Some(3)).unwrap().shards;
    for (i, mut live) in shards(3).into_iter().enumerate() {
        store.restore_shard_into(full, &mut live).unwrap();
        assert_eq!(live.snapshot().unwrap(), three[i]);
    }
}

#[test]
fn a_corrupt_full_shard_file_is_named_and_leaves_the_shard_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), 11);
    let full = *truth.keys().next().unwrap();
    let file = store.version_dir(full).join("shard-1.snapshot");
    let good = std::fs::read(&file).unwrap();
    // Shard 1 holds version 2's state; every refused restore must leave it there.
    let mut live = shards(4).swap_remove(1);
    let v2 = *truth.keys().nth(1).unwrap();
    store.restore_shard_into(v2, &mut live).unwrap();
    let before = live.snapshot().unwrap();
    let header_len = u64::from_le_bytes(good[8..16].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut float = good.clone();
    *float.last_mut().unwrap() ^= 0x40; // the last float: found only by the file's CRC
    cases.push(("a float", float, "CRC32C"));
    let mut nan = good.clone();
    nan[24 + header_len..24 + header_len + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    cases.push(("a float made NaN", nan, "CRC32C"));
    let mut header = good.clone();
    header[24 + header_len / 2] ^= 0x01;
    cases.push(("the header", header, "header CRC32C"));
    let mut magic = good.clone();
    magic[0] = b'X';
    cases.push(("the magic", magic, "bad magic"));
    let mut long = good.clone();
    long[8..16].copy_from_slice(&(good.len() as u64).to_le_bytes());
    cases.push(("the header length", long, "a header of"));
    cases.push(("a truncation", good[..good.len() - 4].to_vec(), "truncated"));
    for (what, bytes, says) in cases {
        std::fs::write(&file, &bytes).unwrap();
        let e = store.restore_shard_into(full, &mut live).unwrap_err();
        assert!(matches!(e, CkptError::Corrupt { .. }), "{what}: {e}");
        let e = e.to_string();
        assert!(
            e.contains("shard-1.snapshot is corrupt") && e.contains(says),
            "{what}: {e}"
        );
        assert_eq!(live.snapshot().unwrap(), before, "{what} changed the shard");
        // The in-memory path refuses it alike.
        assert!(store.restore(full, None).is_err(), "{what}");
        assert!(store.verify(full).is_err(), "{what}");
    }
    std::fs::remove_file(&file).unwrap();
    let e = store.restore_shard_into(full, &mut live).unwrap_err();
    assert!(matches!(e, CkptError::Missing { .. }), "{e}");
    std::fs::write(&file, &good).unwrap();
    store.restore_shard_into(full, &mut live).unwrap();
    assert_eq!(live.snapshot().unwrap(), truth[&full][1]);
}

#[test]
fn a_store_written_in_format_1_still_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), 13);
    // Rewrite the full version as format version 1 wrote it: each shard one msgpack
    // snapshot, `shard-<i>.msgpack`, and the manifest saying version 1.
    let full = *truth.keys().next().unwrap();
    let dir = store.version_dir(full);
    let mut m = store.manifest(full).unwrap();
    for (i, snap) in truth[&full].iter().enumerate() {
        let bytes = rmp_serde::to_vec(snap).unwrap();
        std::fs::remove_file(dir.join(format!("shard-{i}.snapshot"))).unwrap();
        m.files.remove(&format!("shard-{i}.snapshot"));
        std::fs::write(dir.join(format!("shard-{i}.msgpack")), &bytes).unwrap();
        let sum = FileSum {
            bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(&bytes),
        };
        m.files.insert(format!("shard-{i}.msgpack"), sum);
    }
    m.format_version = 1;
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    store.verify(full).unwrap();
    for v in [full, *truth.keys().last().unwrap()] {
        assert_eq!(
            store.restore(v, None).unwrap().shards,
            truth[&v],
            "version {v}"
        );
        let mut live = shards(4).swap_remove(2);
        store.restore_shard_into(v, &mut live).unwrap();
        assert_eq!(live.snapshot().unwrap(), truth[&v][2], "version {v}");
    }
    // A format this build does not know is refused, by name.
    m.format_version = FORMAT_VERSION + 1;
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let e = store.restore(full, None).unwrap_err().to_string();
    assert!(
        e.contains("manifest.json is corrupt") && e.contains("v1 to v3"),
        "{e}"
    );
}

#[tokio::test]
async fn a_local_shard_owner_restores_from_the_store_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), 17);
    let full = *truth.keys().next().unwrap();
    let newest = *truth.keys().last().unwrap();
    let (h, _) = ShardHandle::spawn(ShardArgs {
        shard: 3,
        shard_count: 4,
        tables: tables(),
        spill_dir: None,
        restore: None,
        faults: Faults::default(),
    })
    .await
    .unwrap();
    assert!(h.is_local());
    for v in [full, newest] {
        assert!(h.restore_from(&store, v).await.unwrap() > 0);
        assert_eq!(h.snapshot().await.unwrap(), truth[&v][3], "version {v}");
    }
    // A corrupt file is refused, typed and named, and the owner keeps the state it had.
    let file = store.version_dir(full).join("shard-3.snapshot");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let e = h.restore_from(&store, full).await.unwrap_err();
    assert!(
        matches!(
            e,
            ShardError::Restore {
                shard: 3,
                source: CkptError::Corrupt { .. }
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("shard-3.snapshot"), "{e}");
    assert_eq!(h.snapshot().await.unwrap(), truth[&newest][3]);
    assert!(h.stats().await.is_ok(), "the owner keeps serving");
}

#[test]
fn restore_reshards_into_1_3_and_8() {
    let seed = crate::testkit::seed("restore_reshards_into_1_3_and_8");
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), seed);
    let (&v, want) = truth.iter().last().unwrap();
    let by_key = |snaps: &[ShardSnapshot], t: usize| {
        let mut rows: Vec<(u64, Vec<f32>)> = snaps
            .iter()
            .flat_map(|s| {
                s.tables[t]
                    .rows_by_key()
                    .into_iter()
                    .map(|(k, r)| (k, r.to_vec()))
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        rows
    };
    for n in [1u32, 3, 8] {
        let r = store.restore(v, Some(n)).unwrap();
        assert_eq!(r.shards.len(), n as usize);
        for t in 0..2 {
            assert_eq!(
                by_key(&r.shards, t),
                by_key(want, t),
                "{n} shards, table {t}"
            );
        }
        // Pending admission counts move with their keys.
        let pending = |snaps: &[ShardSnapshot]| {
            let mut all: Vec<(u64, u32)> = snaps
                .iter()
                .flat_map(|s| match &s.tables[0].admission {
                    crate::embedding::AdmissionSnapshot::Counter(v) => v.clone(),
                    _ => panic!("counter admission expected"),
                })
                .collect();
            all.sort_unstable();
            all
        };
        assert_eq!(pending(&r.shards), pending(want));
        let mut live = shards(n);
        for (s, snap) in live.iter_mut().zip(r.shards) {
            for t in &snap.tables {
                for &k in &t.rows.keys {
                    assert_eq!(shard_of(k, n), snap.shard, "key {k} in the wrong shard");
                }
            }
            s.restore(snap).unwrap();
        }
    }
}

#[test]
fn corrupt_truncated_or_missing_files_are_named_and_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), 5);
    let newest = *truth.keys().last().unwrap();
    let dir = store.version_dir(newest);
    let file = dir.join("shard-2.delta.msgpack");
    let good = std::fs::read(&file).unwrap();

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x01;
    std::fs::write(&file, &flipped).unwrap();
    let e = store.restore(newest, None).unwrap_err().to_string();
    assert!(
        e.contains("shard-2.delta.msgpack is corrupt: CRC32C"),
        "{e}"
    );
    assert!(store.verify(newest).is_err());

    std::fs::write(&file, &good[..good.len() - 3]).unwrap();
    let e = store.restore(newest, None).unwrap_err().to_string();
    assert!(
        e.contains("shard-2.delta.msgpack is corrupt") && e.contains("truncated"),
        "{e}"
    );

    std::fs::remove_file(&file).unwrap();
    let e = store.restore(newest, None).unwrap_err();
    assert!(matches!(e, CkptError::Missing { .. }), "{e}");
    assert!(
        e.to_string().contains("shard-2.delta.msgpack is missing"),
        "{e}"
    );

    // The caller can fall back to the newest good version.
    let (r, skipped) = store.restore_newest(None).unwrap();
    assert_eq!(r.manifest.version, newest - 1);
    assert_eq!(skipped.len(), 1);
    assert_eq!(&r.shards, &truth[&(newest - 1)]);

    // A corrupt base breaks every version built on it, and each says so.
    let base = store.version_dir(1).join("dense.msgpack");
    std::fs::write(&base, b"garbage").unwrap();
    assert!(store
        .restore(1, None)
        .unwrap_err()
        .to_string()
        .contains("dense.msgpack"));
    let m = store.version_dir(2).join("manifest.json");
    std::fs::write(&m, b"{not json").unwrap();
    let e = store.manifest(2).unwrap_err().to_string();
    assert!(e.contains("manifest.json is corrupt"), "{e}");
}

#[test]
fn retention_keeps_recent_fulls_their_deltas_and_pinned_chains() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path()).unwrap();
    let mut sh = shards(2);
    let mut rng = Xoshiro256::seed_from_u64(3);
    let mut last: Option<(u64, TableVersions)> = None;
    // full, delta, delta, full, delta, full, delta
    for (step, full) in [true, false, false, true, false, true, false]
        .into_iter()
        .enumerate()
    {
        train_step(&mut sh, &mut rng, step as u64 + 1);
        let now = snap_all(&mut sh);
        let payload = match (&last, full) {
            (Some((p, v)), false) => Payload::Delta {
                parent: *p,
                shards: sh
                    .iter_mut()
                    .zip(v)
                    .map(|(s, v)| s.delta_since(v).unwrap())
                    .collect(),
            },
            _ => Payload::Full(now.clone()),
        };
        let m = store.write(meta(step as u64), &dense(1), &payload).unwrap();
        last = Some((m.version, versions_of(&now)));
    }
    store.pin("replica-0", 2).unwrap();
    assert_eq!(
        store.pins().unwrap(),
        BTreeMap::from([("replica-0".into(), 2)])
    );
    let deleted = store.retain(1).unwrap();
    // Keep full 6 and its delta 7; replica-0 uses 2, which needs 1. 3, 4, 5 go.
    assert_eq!(deleted, vec![3, 4, 5]);
    assert_eq!(store.versions().unwrap(), vec![1, 2, 6, 7]);
    store.restore(2, None).unwrap();
    store.restore(7, None).unwrap();
    store.unpin("replica-0").unwrap();
    assert_eq!(store.retain(1).unwrap(), vec![1, 2]);
    assert!(store.pin("../evil", 1).is_err());
    std::fs::write(tmp.path().join("pins").join("bad"), "x").unwrap();
    assert!(
        store.retain(1).is_err(),
        "an unreadable pin must stop deletion"
    );
}

#[test]
fn retention_within_bytes_drops_older_deltas_then_older_fulls_never_the_newest_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path()).unwrap();
    let mut sh = shards(2);
    let mut rng = Xoshiro256::seed_from_u64(5);
    let mut last: Option<(u64, TableVersions)> = None;
    // Chains 1-3, 4-6, 7-9 (a full and two deltas each).
    for step in 1..=9u64 {
        train_step(&mut sh, &mut rng, step);
        let now = snap_all(&mut sh);
        let payload = match &last {
            Some((p, v)) if step % 3 != 1 => Payload::Delta {
                parent: *p,
                shards: sh
                    .iter_mut()
                    .zip(v)
                    .map(|(s, v)| s.delta_since(v).unwrap())
                    .collect(),
            },
            _ => Payload::Full(now.clone()),
        };
        let m = store.write(meta(step), &dense(step), &payload).unwrap();
        last = Some((m.version, versions_of(&now)));
    }
    let size = |vs: &[u64]| -> u64 { vs.iter().map(|&v| store.manifest(v).unwrap().bytes()).sum() };
    let newest_chain = size(&[7, 8, 9]);
    // Room for the newest chain and both older fulls: the older deltas go, oldest first.
    let room = newest_chain + size(&[1, 4]);
    assert_eq!(
        store.retain_within(3, Some(room)).unwrap(),
        vec![2, 3, 5, 6]
    );
    assert_eq!(store.versions().unwrap(), vec![1, 4, 7, 8, 9]);
    store.restore(1, None).unwrap();
    // Then the older fulls; a pinned one stays, and the newest chain stays whatever the bound.
    store.pin("replica-0", 4).unwrap();
    assert_eq!(store.retain_within(3, Some(1)).unwrap(), vec![1]);
    assert_eq!(store.versions().unwrap(), vec![4, 7, 8, 9]);
    store.unpin("replica-0").unwrap();
    assert_eq!(store.retain_within(3, Some(1)).unwrap(), vec![4]);
    assert_eq!(store.versions().unwrap(), vec![7, 8, 9]);
    assert_eq!(store.restore(9, None).unwrap().dense, dense(9));
}

#[test]
fn serving_export_has_weights_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(&tmp.path().join("store"), 9);
    let v = *truth.keys().last().unwrap();
    let out = tmp.path().join("serving");
    store.export_serving(v, &out).unwrap();
    let (m, d, shards) = load_serving(&out).unwrap();
    assert_eq!(m.kind, VersionKind::Serving);
    assert!(d.optimizer.m.is_empty() && d.optimizer.v.is_empty());
    for (s, want) in shards.iter().zip(&truth[&v]) {
        for (t, w) in s.tables.iter().zip(&want.tables) {
            assert_eq!(t.keys, w.rows.keys);
            let dim = t.dim as usize;
            for i in 0..t.keys.len() {
                assert_eq!(
                    &t.weights[i * dim..(i + 1) * dim],
                    &w.rows.row(i, w.row_floats as usize)[..dim]
                );
            }
        }
    }
    assert!(
        store.export_serving(v, &out).is_err(),
        "an export never overwrites"
    );
}

#[tokio::test]
async fn writer_captures_versions_at_step_boundaries_and_announces_them() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path()).unwrap();
    // A directory left by a writer that died mid-version.
    std::fs::create_dir(tmp.path().join(".tmp-9-1")).unwrap();
    let router = ShardRouter::spawn_local(3, tables(), None, vec![])
        .await
        .unwrap();
    let (ckpt, _join) = CheckpointHandle::spawn(WriterArgs {
        store: store.clone(),
        shards: router.clone(),
        schedule: Schedule {
            every_steps: Some(4),
            every: None,
            full_every: 2,
            keep_full: 10,
            keep_bytes: None,
        },
        samples: None,
        faults: Default::default(),
    })
    .await
    .unwrap();
    let mut announced = ckpt.subscribe().unwrap();
    let mut rng = Xoshiro256::seed_from_u64(17);
    let mut expected = BTreeMap::new();
    for step in 1..=15u64 {
        let keys: Vec<u64> = (0..40).map(|_| rng.below(300)).collect();
        let ctx = TrainCtx {
            step,
            now_ms: 100_000,
        };
        for (name, cfg) in tables() {
            router
                .lookup_for_training(&name, cfg.dim, &keys, ctx)
                .await
                .unwrap();
            let grads: Vec<f32> = (0..keys.len() * cfg.dim)
                .map(|_| rng.next_f32() - 0.5)
                .collect();
            router
                .apply_gradients(&name, cfg.dim, &keys, &grads, ctx)
                .await
                .unwrap();
        }
        if step == 7 {
            ckpt.demand();
        }
        if ckpt.due(step) {
            let mut snaps = Vec::new();
            for h in router.shards() {
                snaps.push(h.snapshot().await.unwrap());
            }
            expected.insert(step, snaps);
            ckpt.capture(StepBoundary {
                meta: meta(step),
                dense: dense(step),
                full: false,
            })
            .await
            .unwrap();
        }
    }
    let stats = ckpt.flush().await.unwrap();
    assert_eq!(stats.write_failures, 0, "{stats:?}");
    // Step 4 (full), 7 (on demand; the step count restarts there), 11, then 15 (full again
    // after 2 deltas).
    assert_eq!(
        expected.keys().copied().collect::<Vec<_>>(),
        vec![4, 7, 11, 15]
    );
    assert_eq!((stats.full_written, stats.deltas_written), (2, 2));
    assert!(
        !tmp.path().join(".tmp-9-1").exists(),
        "stale temporaries are removed"
    );
    let mut kinds = Vec::new();
    for (step, snaps) in &expected {
        let m = announced.recv().await.unwrap().body;
        assert_eq!(m.step, *step);
        kinds.push(m.kind);
        let r = store.restore(m.version, None).unwrap();
        assert_eq!(&r.shards, snaps, "version {} (step {step})", m.version);
    }
    use VersionKind::{Delta, Full};
    assert_eq!(kinds, vec![Full, Delta, Delta, Full]);
    ckpt.stop();
    router.stop();
}

#[tokio::test]
async fn a_writer_within_a_byte_bound_starts_chains_over_and_keeps_only_what_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path()).unwrap();
    let router = ShardRouter::spawn_local(2, tables(), None, vec![])
        .await
        .unwrap();
    let log_dir = tempfile::tempdir().unwrap();
    let samples = crate::stream::EmbeddedLog::open(
        log_dir.path(),
        "samples",
        crate::stream::LogConfig {
            partitions: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let samples = std::sync::Arc::new(samples);
    // A bound below any version's size: a chain may take twice its full version, not
    // more, and retention keeps the newest chain alone.
    let writer_args = || WriterArgs {
        store: store.clone(),
        shards: router.clone(),
        schedule: Schedule {
            every_steps: Some(1),
            every: None,
            full_every: 100,
            keep_full: 10,
            keep_bytes: Some(2),
        },
        samples: Some(samples.clone()),
        faults: Default::default(),
    };
    let (ckpt, first) = CheckpointHandle::spawn(writer_args()).await.unwrap();
    // Before its first version: an empty store trains from the start of the log.
    assert_eq!(
        samples.holds()[super::writer::RETENTION_HOLDER],
        BTreeMap::from([(0, 0), (1, 0), (2, 0)])
    );
    let mut rng = Xoshiro256::seed_from_u64(19);
    for step in 1..=4u64 {
        let keys: Vec<u64> = (0..40).map(|_| rng.below(300)).collect();
        let ctx = TrainCtx {
            step,
            now_ms: 100_000,
        };
        for (name, cfg) in tables() {
            router
                .lookup_for_training(&name, cfg.dim, &keys, ctx)
                .await
                .unwrap();
        }
        assert!(ckpt.due(step));
        ckpt.capture(StepBoundary {
            meta: meta(step),
            dense: dense(step),
            full: false,
        })
        .await
        .unwrap();
    }
    let stats = ckpt.flush().await.unwrap();
    // Not a full version each time, which would copy the tables at every version.
    assert!(stats.deltas_written >= 1, "{stats:?}");
    assert!(stats.store_over_bound, "{stats:?}");
    assert_eq!(stats.full_written + stats.deltas_written, 4);
    // Each chain within twice its full version when its last delta began, and only the
    // newest chain kept.
    let kept = store.versions().unwrap();
    let manifests: Vec<_> = kept.iter().map(|&v| store.manifest(v).unwrap()).collect();
    let head = &manifests[0];
    assert_eq!(head.kind, VersionKind::Full, "{kept:?}");
    assert!(manifests[1..]
        .iter()
        .all(|m| m.kind == VersionKind::Delta && m.base == head.version));
    assert_eq!(kept.last(), Some(&4));
    assert_eq!(stats.versions_deleted, 4 - kept.len() as u64);
    let before_last: u64 = manifests[..manifests.len() - 1]
        .iter()
        .map(|m| m.bytes())
        .sum();
    assert!(before_last < 2 * head.bytes(), "{kept:?}");
    // The sample log is held from the oldest kept version's offsets; partition 2, which no
    // version names, from its start.
    let oldest = head.step;
    assert_eq!(
        samples.holds()[super::writer::RETENTION_HOLDER],
        BTreeMap::from([(0, oldest * 10), (1, oldest * 7), (2, 0)])
    );
    ckpt.stop();
    first.await.unwrap();
    // A restarted writer holds the log from the store's versions before it writes one, even
    // where the hold it finds is stale.
    crate::stream::StreamLog::hold(&*samples, super::writer::RETENTION_HOLDER, 0, 0).unwrap();
    let (ckpt, _join) = CheckpointHandle::spawn(writer_args()).await.unwrap();
    assert_eq!(
        samples.holds()[super::writer::RETENTION_HOLDER],
        BTreeMap::from([(0, oldest * 10), (1, oldest * 7), (2, 0)])
    );
    ckpt.stop();
    router.stop();
}

#[test]
fn a_manifest_changed_by_one_digit_is_refused_and_an_annotated_one_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), 23);
    let v = *truth.keys().last().unwrap();
    let path = store.version_dir(v).join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.trim_end().ends_with('}') && text.contains("\"checksum\": "),
        "{text}"
    );
    // Annotating reseals: the manifest still reads, with its verdict.
    store
        .set_validation(
            v,
            Validation {
                passed: true,
                samples: 10,
                metrics: BTreeMap::new(),
                at_unix_ms: 1,
                reason: None,
            },
        )
        .unwrap();
    assert!(store.manifest(v).unwrap().validation.is_some());
    let text = std::fs::read_to_string(&path).unwrap();

    // One digit of `step` changed, as an operator's editor or a bad disk might.
    let at = text.find("\"step\": ").unwrap() + "\"step\": ".len();
    let mut edited = text.clone().into_bytes();
    edited[at] = if edited[at] == b'9' {
        b'1'
    } else {
        edited[at] + 1
    };
    std::fs::write(&path, &edited).unwrap();
    for e in [
        store.manifest(v).unwrap_err(),
        store.verify(v).unwrap_err(),
        store.restore(v, None).err().unwrap(),
    ] {
        let s = e.to_string();
        assert!(
            matches!(e, CkptError::Corrupt { .. })
                && s.contains("manifest.json")
                && s.contains("checksum"),
            "{s}"
        );
    }
    // The checksum itself changed: refused the same way.
    let seal = text.rfind("\"checksum\": ").unwrap() + "\"checksum\": ".len();
    let mut edited = text.clone().into_bytes();
    edited[seal] = if edited[seal] == b'9' {
        b'1'
    } else {
        edited[seal] + 1
    };
    std::fs::write(&path, &edited).unwrap();
    assert!(matches!(store.manifest(v), Err(CkptError::Corrupt { .. })));
    // Without it, a version-3 manifest is refused too; restored, it reads again.
    let stripped = text.replace(&text[text.rfind(",\n  \"checksum\"").unwrap()..], "\n}");
    std::fs::write(&path, stripped).unwrap();
    let e = store.manifest(v).unwrap_err().to_string();
    assert!(e.contains("requires a checksum"), "{e}");
    std::fs::write(&path, &text).unwrap();
    assert_eq!(store.restore(v, None).unwrap().shards, truth[&v]);
}

/// Restores the newest live version, setting aside what fails as the trainer does
/// (`training::restore_newest_good`); returns the version restored.
fn restore_or_set_aside(store: &ModelStore) -> Option<u64> {
    let mut v = store.latest_live().unwrap()?;
    loop {
        match store.restore(v, None) {
            Ok(_) => return Some(v),
            Err(e) => {
                assert!(e.is_integrity(), "{e}");
                store
                    .set_aside_failed_restore(v, store.version_at_fault(&e), &e.to_string())
                    .unwrap();
                v = store.latest_live().unwrap()?;
            }
        }
    }
}

#[test]
fn versions_that_fail_verification_are_set_aside_with_their_reason_and_never_renumbered() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, truth) = write_chain(tmp.path(), 29);
    let vs: Vec<u64> = truth.keys().copied().collect();
    let newest = *vs.last().unwrap();
    // The newest delta's shard file truncated: that version alone goes.
    let p = store.version_dir(newest).join("shard-2.delta.msgpack");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(restore_or_set_aside(&store), Some(newest - 1));
    let q = store.quarantined().unwrap();
    assert_eq!(q.iter().map(|q| q.version).collect::<Vec<_>>(), [newest]);
    assert!(
        q[0].reason.contains("shard-2.delta.msgpack is corrupt")
            && q[0].reason.contains("truncated"),
        "{}",
        q[0].reason
    );
    assert!(
        q[0].dir.join("shard-2.delta.msgpack").is_file(),
        "kept, not deleted"
    );

    // A manifest missing: set aside before anything reads the store; the versions restored
    // through it go when a restore reaches them.
    std::fs::remove_file(store.version_dir(newest - 2).join("manifest.json")).unwrap();
    let unreadable = store.set_aside_unreadable().unwrap();
    assert_eq!(
        unreadable.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
        [newest - 2]
    );
    assert_eq!(restore_or_set_aside(&store), Some(newest - 3));
    let reason = &store
        .quarantined()
        .unwrap()
        .iter()
        .find(|q| q.version == newest - 1)
        .unwrap()
        .reason
        .clone();
    assert!(
        reason.contains(&format!("restores through version {}", newest - 2)),
        "{reason}"
    );

    // The full version corrupt: every version on it goes, and none is left.
    let full = vs[0];
    let p = store.version_dir(full).join("shard-0.snapshot");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    assert_eq!(restore_or_set_aside(&store), None);
    assert!(store.versions().unwrap().is_empty());
    assert_eq!(store.quarantined().unwrap().len(), vs.len());

    // The next version written is numbered past every version ever written.
    let m = store
        .write(
            meta(99),
            &dense(99),
            &Payload::Full(snap_all(&mut shards(4))),
        )
        .unwrap();
    assert_eq!(m.version, newest + 1);
}

/// A W&D dense state of the default shape (1024-512-256 over 26 fields of 16 and 13 dense).
fn wdl_dense() -> DenseState {
    DenseNet::new(
        ModelConfig::new(ModelKind::Wdl),
        InputShape {
            fields: vec![16; 26],
            dense: 13,
        },
    )
    .unwrap()
    .state()
}

#[test]
fn a_delta_stores_the_dense_state_as_a_small_diff_and_a_v2_delta_still_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path()).unwrap();
    let mut sh = shards(2);
    let base = wdl_dense();
    let full = store
        .write(meta(1), &base, &Payload::Full(snap_all(&mut sh)))
        .unwrap();
    let since = versions_of(&snap_all(&mut sh));
    // The next version: the pending gradient sum started, nothing else moved, as between
    // two dense updates.
    let mut next = base.clone();
    next.pending = Some(crate::dense::PendingUpdate {
        rows: 40,
        grads: (0..next.params.len())
            .map(|i| ((i % 11) as f32 - 5.0) * 1e-3)
            .collect(),
    });
    let delta = |sh: &mut Vec<EmbeddingShard>| Payload::Delta {
        parent: full.version,
        shards: sh
            .iter_mut()
            .zip(&since)
            .map(|(s, v)| s.delta_since(v).unwrap())
            .collect(),
    };
    let d = store
        .write_after(meta(2), &next, &delta(&mut sh), Some((full.version, &base)))
        .unwrap();
    let whole = full.files["dense.msgpack"].bytes;
    let diff = d.files["dense.diff.msgpack"].bytes;
    assert!(!d.files.contains_key("dense.msgpack"));
    println!("dense: whole {whole} bytes, diff {diff} bytes");
    assert!(diff * 4 < whole, "diff {diff} of whole {whole}");
    assert_eq!(store.restore_dense(d.version).unwrap().1, next);
    // Without the parent's state at hand, the store restores it: the same bytes.
    let again = store.write(meta(2), &next, &delta(&mut sh)).unwrap();
    assert_eq!(
        again.files["dense.diff.msgpack"],
        d.files["dense.diff.msgpack"]
    );
    let (_, update, _) = store.read_delta(d.version).unwrap();
    assert_eq!(update.apply_to(&base).unwrap(), next);

    // A delta as format v2 wrote it, the whole dense state in dense.msgpack: read as before.
    let dir = store.version_dir(again.version);
    let mut m = store.manifest(again.version).unwrap();
    std::fs::remove_file(dir.join("dense.diff.msgpack")).unwrap();
    m.files.remove("dense.diff.msgpack");
    let bytes = rmp_serde::to_vec(&next).unwrap();
    std::fs::write(dir.join("dense.msgpack"), &bytes).unwrap();
    m.files.insert(
        "dense.msgpack".into(),
        FileSum {
            bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(&bytes),
        },
    );
    m.format_version = 2;
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    assert_eq!(store.restore_dense(again.version).unwrap().1, next);
    let (_, update, _) = store.read_delta(again.version).unwrap();
    assert!(matches!(update, crate::dense::DenseUpdate::Whole(_)));
}

#[test]
fn a_version_exported_and_imported_elsewhere_restores_the_same_and_a_bad_one_is_refused() {
    let seed = crate::testkit::seed("a_version_exported_and_imported_elsewhere");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (store, truth) = write_chain(a.path(), seed);
    let mirror = ModelStore::open(b.path()).unwrap();
    let newest = *truth.keys().last().unwrap();
    // The chain, newest first, as a mirror fetches it.
    for v in store.chain(newest).unwrap().iter().rev().map(|m| m.version) {
        let m = mirror
            .import_version(&store.export_version(v).unwrap())
            .unwrap();
        assert_eq!(m, store.manifest(v).unwrap());
    }
    let r = mirror.restore(newest, None).unwrap();
    assert_eq!(&r.shards, &truth[&newest], "seed {seed}");
    assert_eq!(r.dense, store.restore(newest, None).unwrap().dense);
    // Again: kept as it is.
    let again = store.export_version(newest).unwrap();
    assert_eq!(mirror.import_version(&again).unwrap().version, newest);

    let fresh = ModelStore::open(b.path().join("other")).unwrap();
    let refused = |files: &VersionFiles, says: &str| {
        let e = fresh.import_version(files).unwrap_err().to_string();
        assert!(e.contains(says), "{says}: {e}");
        assert!(fresh.versions().unwrap().is_empty(), "nothing written");
        let leftovers = std::fs::read_dir(fresh.root()).unwrap().count();
        assert_eq!(leftovers, 0, "no temporary left behind");
    };
    let mut flipped = again.clone();
    flipped.files[0].bytes[0] ^= 1;
    refused(&flipped, "CRC32C");
    let mut short = again.clone();
    short.files[0].bytes.pop();
    refused(&short, "bytes");
    let mut missing = again.clone();
    missing.files.pop();
    refused(&missing, "files, its manifest lists");
    let mut renamed = again.clone();
    renamed.files[0].name = "../escape".into();
    refused(&renamed, "not in its manifest");
    let mut other = again.clone();
    other.version += 1;
    refused(&other, "its manifest says version");
    let mut garbled = again.clone();
    garbled.manifest.truncate(garbled.manifest.len() / 2);
    refused(&garbled, "not a manifest");
    let mut edited = again.clone();
    let text = String::from_utf8(edited.manifest.clone()).unwrap();
    edited.manifest = text.replacen("\"step\": ", "\"step\": 1", 1).into_bytes();
    refused(&edited, "checksum");
}
