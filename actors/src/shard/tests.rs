use super::*;
use crate::routing::shard_of;
use crate::testkit::fixtures::user_item_tables as tables;

async fn cluster(n: u32) -> ShardRouter {
    let mut hs = Vec::new();
    for s in 0..n {
        let (h, _) = ShardHandle::spawn(ShardArgs {
            shard: s,
            shard_count: n,
            tables: tables(),
            spill_dir: None,
            restore: None,
            faults: Faults::default(),
        })
        .await
        .unwrap();
        hs.push(h);
    }
    ShardRouter::new(hs)
}

#[tokio::test]
async fn sharded_training_equals_one_shard_and_keys_stay_home() {
    let seed = crate::testkit::seed("sharded_training_equals_one_shard");
    let mut rng = crate::rng::Xoshiro256::seed_from_u64(seed);
    let three = cluster(3).await;
    let one = cluster(1).await;
    let user = TableName::new("user");
    let item = TableName::new("item");
    for step in 0..30u64 {
        let ctx = TrainCtx::at_step(step);
        let keys: Vec<u64> = (0..200).map(|_| rng.below(1000)).collect();
        for (t, dim) in [(&user, 8), (&item, 4)] {
            let a = three.lookup_for_training(t, dim, &keys, ctx).await.unwrap();
            let b = one.lookup_for_training(t, dim, &keys, ctx).await.unwrap();
            assert_eq!(a, b, "seed {seed} step {step}");
            let grads: Vec<f32> = (0..keys.len() * dim)
                .map(|_| rng.next_f32() - 0.5)
                .collect();
            let ra = three
                .apply_gradients(t, dim, &keys, &grads, ctx)
                .await
                .unwrap();
            let rb = one
                .apply_gradients(t, dim, &keys, &grads, ctx)
                .await
                .unwrap();
            assert_eq!(ra.applied, rb.applied);
        }
    }
    let probe: Vec<u64> = (0..1000).collect();
    assert_eq!(
        three.lookup(&user, 8, &probe).await.unwrap(),
        one.lookup(&user, 8, &probe).await.unwrap()
    );
    // Every shard holds only its own keys, and together they hold them all.
    let mut total = 0;
    for h in three.shards() {
        let snap = h.snapshot().await.unwrap();
        for t in &snap.tables {
            for &k in &t.rows.keys {
                assert_eq!(shard_of(k, 3), h.shard(), "key {k} on the wrong shard");
            }
            total += t.rows.len();
        }
    }
    let one_snap = one.shards()[0].snapshot().await.unwrap();
    assert_eq!(
        total,
        one_snap.tables.iter().map(|t| t.rows.len()).sum::<usize>()
    );
    let stats = three.stats().await.unwrap();
    assert!(stats.iter().all(|s| s.counters.training_lookups > 0));
}

/// Gradients sent and not yet awaited are applied before any later request: a lookup sent
/// right after them reads what a lookup after awaiting them reads.
#[tokio::test]
async fn a_lookup_after_sent_gradients_sees_them() {
    let seed = crate::testkit::seed("lookup_after_sent_gradients");
    let mut rng = crate::rng::Xoshiro256::seed_from_u64(seed);
    let piped = cluster(3).await;
    let waited = cluster(3).await;
    let user = TableName::new("user");
    for step in 0..20u64 {
        let ctx = TrainCtx::at_step(step);
        let keys: Vec<u64> = (0..300).map(|_| rng.below(2000)).collect();
        let plan = piped.plan(&keys);
        assert_eq!(plan.len(), keys.len());
        let a = piped
            .lookup_for_training_planned(&user, 8, &plan, ctx)
            .await
            .unwrap();
        let b = waited
            .lookup_for_training(&user, 8, &keys, ctx)
            .await
            .unwrap();
        assert_eq!(a, b, "seed {seed} step {step}");
        let grads: Vec<f32> = (0..keys.len() * 8).map(|_| rng.next_f32() - 0.5).collect();
        // Not awaited before the next lookup.
        let pending = piped
            .send_gradients(&user, 8, &plan, &grads, ctx, &tracing::Span::none())
            .unwrap();
        let want = waited
            .apply_gradients(&user, 8, &keys, &grads, ctx)
            .await
            .unwrap();
        let probe: Vec<u64> = keys.iter().map(|k| k + 1).collect();
        assert_eq!(
            piped.lookup(&user, 8, &probe).await.unwrap(),
            waited.lookup(&user, 8, &probe).await.unwrap(),
            "seed {seed} step {step}"
        );
        let rep = pending.wait().await.unwrap();
        assert_eq!(rep.applied, want.applied, "seed {seed} step {step}");
        assert_eq!(rep.merged_duplicates, want.merged_duplicates);
    }
    let all: Vec<u64> = (0..2001).collect();
    assert_eq!(
        piped.lookup(&user, 8, &all).await.unwrap(),
        waited.lookup(&user, 8, &all).await.unwrap(),
        "seed {seed}"
    );
    piped.stop();
    waited.stop();
}

#[tokio::test]
async fn errors_come_back_typed_and_the_shard_keeps_serving() {
    let r = cluster(2).await;
    let h = &r.shards()[0];
    let err = h
        .lookup(&TableName::new("nope"), vec![1])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ShardError::Embedding {
                source: EmbeddingError::UnknownTable(_),
                ..
            }
        ),
        "{err}"
    );
    let err = h
        .apply_gradients(
            &TableName::new("user"),
            vec![1, 2],
            vec![0.0; 3],
            TrainCtx::default(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("gradient block has 3 floats"),
        "{err}"
    );
    assert_eq!(
        h.lookup(&TableName::new("user"), vec![1])
            .await
            .unwrap()
            .len(),
        8
    );
    assert_eq!(h.stats().await.unwrap().counters.errors, 2);
    // A stopped shard answers Unavailable, not a hang or a panic.
    h.actor().stop(None);
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while h.actor().get_status() != ractor::ActorStatus::Stopped {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("shard stops");
    let err = h
        .lookup(&TableName::new("user"), vec![1])
        .await
        .unwrap_err();
    assert!(matches!(err, ShardError::Unavailable { .. }), "{err}");
}

#[tokio::test]
async fn restart_from_snapshot_resumes_the_same_state() {
    let r = cluster(1).await;
    let user = TableName::new("user");
    let keys: Vec<u64> = (0..100).collect();
    r.lookup_for_training(&user, 8, &keys, TrainCtx::at_step(1))
        .await
        .unwrap();
    r.apply_gradients(&user, 8, &keys, &vec![0.1; 800], TrainCtx::at_step(1))
        .await
        .unwrap();
    let snap = r.shards()[0].snapshot().await.unwrap();
    let before = r.lookup(&user, 8, &keys).await.unwrap();
    r.shards()[0].actor().stop(None);
    let (h, _) = ShardHandle::spawn(ShardArgs {
        shard: 0,
        shard_count: 1,
        tables: tables(),
        spill_dir: None,
        restore: Some(snap.clone()),
        faults: Faults::default(),
    })
    .await
    .unwrap();
    let mut after = h.snapshot().await.unwrap();
    assert_eq!(
        after, snap,
        "the restarted shard starts exactly at the snapshot"
    );
    assert_eq!(h.lookup(&user, keys.clone()).await.unwrap(), before);
    // The lookup only moved the access counters; the model is unchanged.
    after = h.snapshot().await.unwrap();
    assert_eq!(after.tables[0].rows, snap.tables[0].rows);
}
