use std::collections::BTreeMap;
use std::sync::Arc;

use super::replica::{ReplicaArgs, ReplicaHandle};
use super::*;
use crate::ckpt::{ModelStore, Payload, VersionMeta};
use crate::dense::{DenseState, ModelConfig, ModelKind, Threads};
use crate::embedding::{CapacityPolicy, EmbeddingShard, EvictionConfig, TableConfig, TrainCtx};
use crate::ids::TableName;
use crate::rng::Xoshiro256;
use crate::routing::shard_of;
use crate::sample::hash::feature_id;
use crate::sample::json::{RawField, RawValue};
use crate::sample::Schema;
use crate::scorer::Scorer;
use crate::training::{default_table_config, Trainer};

const SHARDS: u32 = 2;

fn schema() -> Schema {
    Schema::criteo(4)
}

fn model() -> ModelConfig {
    let mut m = ModelConfig::new(ModelKind::Wdl);
    m.hidden = Some(vec![16, 8]);
    m
}

/// The model's tables; a capacity limit makes training evict, so deltas carry tombstones.
fn tables() -> Vec<(TableName, TableConfig)> {
    Scorer::required_tables(&schema(), &model())
        .into_iter()
        .map(|(n, d)| {
            let mut c = default_table_config(d);
            c.eviction = EvictionConfig {
                capacity: Some(120),
                capacity_policy: CapacityPolicy::Lru,
                sweep_rows_per_call: 64,
                ..EvictionConfig::default()
            };
            (TableName::new(&n), c)
        })
        .collect()
}

fn meta(step: u64) -> VersionMeta {
    VersionMeta {
        step,
        rows_trained: step * 100,
        samples_rejected: 0,
        replays: Vec::new(),
        calibrated_from: None,
        sample_offsets: BTreeMap::from([(0, step * 100)]),
        joiner_offsets: BTreeMap::new(),
        model: model(),
        schema: schema(),
        tables: tables()
            .into_iter()
            .map(|(n, c)| (n.to_string(), c))
            .collect(),
        placement: None,
    }
}

/// Dense weights that differ per step, so a wrong dense state shows in the scores.
fn dense(step: u64) -> DenseState {
    let mut m = model();
    m.seed = step;
    Trainer::new(schema(), m).unwrap().net().state()
}

/// The ids a request's value `v` of field `C{f}` hashes to.
fn key(f: usize, v: u64) -> u64 {
    feature_id(&format!("C{f}"), &format!("v{v}"))
}

/// Touches and updates the rows of values drawn from `0..vocab` of fields C1..C3.
fn train_step(sh: &mut [EmbeddingShard], rng: &mut Xoshiro256, step: u64, vocab: u64) {
    let name = TableName::new("emb");
    let dim = tables()[0].1.dim;
    let keys: Vec<u64> = (0..40)
        .map(|_| key(1 + (rng.next_u64() % 3) as usize, rng.next_u64() % vocab))
        .collect();
    for s in 0..SHARDS {
        let mut mine: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|&k| shard_of(k, SHARDS) == s)
            .collect();
        mine.sort_unstable();
        mine.dedup();
        let t = sh[s as usize].table_mut(&name).unwrap();
        let ctx = TrainCtx {
            step,
            now_ms: step * 1000,
        };
        let mut out = Vec::new();
        t.lookup_for_training(&mine, &ctx, &mut out).unwrap();
        let grads: Vec<f32> = (0..mine.len() * dim)
            .map(|_| rng.next_f32() - 0.5)
            .collect();
        t.apply_gradients(&mine, &grads, &ctx).unwrap();
    }
}

/// A store holding a full version 1 and deltas 2..=4 of a trained, evicting model.
fn store_with_chain(root: &std::path::Path, seed: u64) -> ModelStore {
    let store = ModelStore::open(root).unwrap();
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let mut sh: Vec<EmbeddingShard> = (0..SHARDS)
        .map(|s| EmbeddingShard::new(s, SHARDS, &tables(), None).unwrap())
        .collect();
    for step in 1..=4 {
        for _ in 0..5 {
            train_step(&mut sh, &mut rng, step, 400);
        }
    }
    let snaps: Vec<_> = sh.iter_mut().map(|s| s.snapshot().unwrap()).collect();
    let mut since: Vec<_> = snaps.iter().map(|s| s.table_versions()).collect();
    let mut parent = store
        .write(meta(4), &dense(4), &Payload::Full(snaps))
        .unwrap()
        .version;
    for step in 5..=7 {
        for _ in 0..5 {
            train_step(&mut sh, &mut rng, step, 400);
        }
        let deltas: Vec<_> = sh
            .iter_mut()
            .zip(&since)
            .map(|(s, v)| s.delta_since(v).unwrap())
            .collect();
        assert!(
            deltas
                .iter()
                .any(|d| d.tables.iter().any(|t| !t.tombstones.is_empty())),
            "the chain must carry deletions (seed {seed})"
        );
        since = deltas.iter().map(|d| d.table_versions()).collect();
        parent = store
            .write(
                meta(step),
                &dense(step),
                &Payload::Delta {
                    parent,
                    shards: deltas,
                },
            )
            .unwrap()
            .version;
    }
    store
}

fn load(store: &ModelStore, v: u64) -> ServingModel {
    ServingModel::from_restored(store.restore(v, None).unwrap()).unwrap()
}

fn delta(store: &ModelStore, v: u64) -> Arc<ModelDelta> {
    let (manifest, dense, shards) = store.read_delta(v).unwrap();
    Arc::new(ModelDelta {
        manifest,
        dense,
        shards,
    })
}

fn one(v: &str) -> RawField {
    RawField::One(RawValue::Str(v.into()))
}

/// Candidates over values that exist, were evicted, or never existed.
fn request(n: usize) -> PredictRequest {
    PredictRequest {
        dense: BTreeMap::from([("I1".into(), 2.0), ("I2".into(), 0.5)]),
        sparse: BTreeMap::from([("C1".into(), one("v3"))]),
        candidates: (0..n)
            .map(|i| Candidate {
                dense: BTreeMap::new(),
                sparse: BTreeMap::from([
                    ("C2".into(), one(&format!("v{}", i * 7 % 500))),
                    ("C3".into(), one(&format!("v{}", i * 13 % 500))),
                ]),
            })
            .collect(),
    }
}

/// Every key of every table, with its weights.
fn contents(m: &ServingModel) -> BTreeMap<u64, Vec<f32>> {
    let t = m.table(&TableName::new("emb")).unwrap();
    (1..=3)
        .flat_map(|f| (0..400).map(move |v| key(f, v)))
        .filter_map(|k| t.get(k).map(|w| (k, w.to_vec())))
        .collect()
}

#[test]
fn deltas_applied_in_the_cell_equal_a_whole_restore() {
    let seed = crate::testkit::seed("deltas_applied_in_the_cell_equal_a_whole_restore");
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_chain(tmp.path(), seed);
    let th = Threads::new(1).unwrap();
    let cell = ModelCell::new();
    cell.install(load(&store, 1));
    for v in 2..=4 {
        assert_eq!(cell.apply(delta(&store, v)).unwrap(), v);
        let got = cell.current().unwrap();
        let want = load(&store, v);
        assert!(contents(&want).len() > 50, "too few rows to compare");
        assert_eq!(got.rows(), want.rows(), "version {v} (seed {seed})");
        assert_eq!(contents(&got), contents(&want), "version {v} (seed {seed})");
        // The spare took the active copy's weights for the lagging delta: still this version's.
        assert_eq!(got.weights().params, want.weights().params, "version {v}");
        let req = request(50);
        assert_eq!(
            got.predict(&req, 1000, &th).unwrap(),
            want.predict(&req, 1000, &th).unwrap(),
            "version {v} (seed {seed})"
        );
    }
    let s = cell.stats();
    // The first delta clones a spare; later ones reuse the old active copy.
    assert_eq!((s.installs, s.deltas_applied, s.spare_clones), (1, 3, 1));
}

#[test]
fn a_chain_of_deltas_is_served_in_one_swap_and_the_spare_catches_up_through_all_of_it() {
    let seed = crate::testkit::seed("a_chain_of_deltas_is_served_in_one_swap");
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_chain(tmp.path(), seed);
    let th = Threads::new(1).unwrap();
    let cell = ModelCell::new();
    cell.install(load(&store, 1));
    // A chain that does not follow the served version: refused, 1 still served.
    assert!(matches!(
        cell.apply_chain(vec![delta(&store, 3), delta(&store, 4)]),
        Err(ServingError::Chain { have: 1, .. })
    ));
    assert_eq!(cell.version(), Some(1));
    assert_eq!(cell.apply_chain(Vec::new()).unwrap(), 1);
    // 2 and 3 in one swap.
    let before = cell.current().unwrap();
    assert_eq!(
        cell.apply_chain(vec![delta(&store, 2), delta(&store, 3)])
            .unwrap(),
        3
    );
    assert_eq!(before.version(), 1, "a reader of 1 keeps 1");
    drop(before);
    // The spare (still at 1) takes 2 and 3, then 4: the same as restoring 4 whole.
    assert_eq!(cell.apply(delta(&store, 4)).unwrap(), 4);
    let (got, want) = (cell.current().unwrap(), load(&store, 4));
    assert_eq!(contents(&got), contents(&want), "seed {seed}");
    assert_eq!(got.weights().params, want.weights().params, "seed {seed}");
    let req = request(50);
    assert_eq!(
        got.predict(&req, 1000, &th).unwrap(),
        want.predict(&req, 1000, &th).unwrap(),
        "seed {seed}"
    );
    let s = cell.stats();
    assert_eq!((s.deltas_applied, s.delta_failures), (3, 0));
}

#[test]
fn a_reader_keeps_its_whole_version_across_an_update() {
    let seed = crate::testkit::seed("a_reader_keeps_its_whole_version_across_an_update");
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_chain(tmp.path(), seed);
    let th = Threads::new(1).unwrap();
    let cell = ModelCell::new();
    cell.install(load(&store, 1));
    cell.apply(delta(&store, 2)).unwrap();
    let req = request(20);
    // A request in flight holds version 2, the copy the next update must not touch.
    let held = cell.current().unwrap();
    let before = (contents(&held), held.predict(&req, 1000, &th).unwrap());
    cell.apply(delta(&store, 3)).unwrap();
    assert_eq!(held.version(), 2);
    assert_eq!(
        (contents(&held), held.predict(&req, 1000, &th).unwrap()),
        before
    );
    assert_eq!(cell.version(), Some(3));
    // Version 2's copy is now the spare; still held, so the next update clones instead of
    // waiting for it forever.
    let clones = cell.stats().spare_clones;
    cell.apply(delta(&store, 4)).unwrap();
    assert_eq!(cell.stats().spare_clones, clones + 1);
    assert_eq!(held.version(), 2);
    assert_eq!(contents(&held), before.0);
    assert_eq!(
        contents(&cell.current().unwrap()),
        contents(&load(&store, 4))
    );
}

#[test]
fn a_delta_out_of_order_is_refused_and_the_served_version_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_chain(tmp.path(), 5);
    let cell = ModelCell::new();
    assert!(matches!(
        cell.apply(delta(&store, 2)),
        Err(ServingError::NotLoaded)
    ));
    cell.install(load(&store, 1));
    let e = cell.apply(delta(&store, 3)).unwrap_err();
    assert!(
        matches!(
            e,
            ServingError::Chain {
                have: 1,
                got: 3,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(cell.version(), Some(1));
    assert_eq!(cell.apply(delta(&store, 2)).unwrap(), 2);
}

#[test]
fn malformed_requests_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_chain(tmp.path(), 6);
    let m = load(&store, 1);
    let th = Threads::new(1).unwrap();
    let bad = |r: PredictRequest, want: &str| match m.predict(&r, 10, &th) {
        Err(ServingError::BadRequest(why)) => assert!(why.contains(want), "{why}"),
        other => panic!("expected a bad request about {want}, got {other:?}"),
    };
    bad(request(0), "no candidates");
    bad(request(11), "at most 10");
    let mut r = request(2);
    r.candidates[1].sparse.insert("C99".into(), one("x"));
    bad(r, "candidate 1");
    let mut r = request(2);
    r.candidates[0].sparse.insert("C1".into(), one("x"));
    bad(r, "field C1 is also given");
    let mut r = request(2);
    r.dense.insert("I3".into(), 1e300);
    bad(r, "I3");
    let mut r = request(2);
    r.dense.insert("nope".into(), 1.0);
    bad(r, "nope");
}

#[test]
fn an_unknown_id_reads_as_the_default_row_and_is_not_inserted() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_chain(tmp.path(), 8);
    let m = load(&store, 1);
    let th = Threads::new(1).unwrap();
    let rows = m.rows();
    let base = PredictRequest {
        candidates: vec![Candidate::default()],
        ..PredictRequest::default()
    };
    let mut unknown = base.clone();
    unknown.candidates[0]
        .sparse
        .insert("C5".into(), one("never-seen"));
    // The default row is zeros: the same as leaving the field out.
    assert_eq!(
        m.predict(&unknown, 1, &th).unwrap(),
        m.predict(&base, 1, &th).unwrap()
    );
    assert_eq!(m.rows(), rows);
    // A known id does change the score.
    let mut known = base.clone();
    let k = (0..400).find(|&v| {
        m.table(&TableName::new("emb"))
            .unwrap()
            .get(key(2, v))
            .is_some()
    });
    known.candidates[0]
        .sparse
        .insert("C2".into(), one(&format!("v{}", k.unwrap())));
    assert_ne!(
        m.predict(&known, 1, &th).unwrap().scores,
        m.predict(&base, 1, &th).unwrap().scores
    );
}

#[tokio::test]
async fn the_replica_follows_publishes_rolls_back_and_survives_a_bad_one() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_chain(tmp.path(), 9);
    let cell = Arc::new(ModelCell::new());
    let (replica, _join) = ReplicaHandle::spawn(ReplicaArgs {
        name: "replica-0".into(),
        store: store.clone(),
        cell: cell.clone(),
        faults: Default::default(),
    })
    .await
    .unwrap();
    for v in 1..=4 {
        replica.publish(v).unwrap();
    }
    let s = replica.status().await.unwrap();
    assert_eq!((s.version, s.full_loads, s.failures), (Some(4), 1, 0));
    assert_eq!(s.cell.deltas_applied, 3);
    assert_eq!(store.pins().unwrap().get("replica-0"), Some(&4));
    assert_eq!(
        contents(&cell.current().unwrap()),
        contents(&load(&store, 4))
    );
    // Back to 2: not a child of 4, so it is restored whole.
    replica.publish(2).unwrap();
    let s = replica.status().await.unwrap();
    assert_eq!((s.version, s.full_loads), (Some(2), 2));
    assert_eq!(store.pins().unwrap().get("replica-0"), Some(&2));
    // A version that does not exist is reported; the replica keeps serving 2.
    replica.publish(99).unwrap();
    let s = replica.status().await.unwrap();
    assert_eq!((s.version, s.failures), (Some(2), 1));
    assert!(s.last_error.unwrap().contains("version 99"));
    // Forward to 4 past 3 (a publication passed over): 3's and 4's deltas, no whole load.
    replica.publish(4).unwrap();
    let s = replica.status().await.unwrap();
    assert_eq!((s.version, s.full_loads), (Some(4), 2));
    assert_eq!(s.cell.deltas_applied, 5);
    assert_eq!(store.pins().unwrap().get("replica-0"), Some(&4));
    assert_eq!(
        contents(&cell.current().unwrap()),
        contents(&load(&store, 4))
    );
    replica.stop();
}
