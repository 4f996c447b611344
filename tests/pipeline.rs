//! The supervised pipeline in one process, on the embedded log, fed live by the simulator:
//! learning, the validation gate, rollback, replay, calibration, and a panic in each actor
//! kind.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_actors::ckpt::writer::Schedule;
use freshet_actors::ckpt::ModelStore;
use freshet_actors::dense::ModelConfig;
use freshet_actors::event::{
    JoinedSample, SampleKind, DEAD_LETTERS_TOPIC, EVENTS_TOPIC, SAMPLES_TOPIC, SAMPLE_REJECTS_TOPIC,
};
use freshet_actors::fault::Faults;
use freshet_actors::joiner::{CheckpointEvery, JoinConfig};
use freshet_actors::online::gate::{GateConfig, Publish};
use freshet_actors::online::pipeline::{Logs, PipelineConfig, PipelineHandle};
use freshet_actors::sample::Schema;
use freshet_actors::scorer::Scorer;
use freshet_actors::simulate::{play_live, SimConfig, Simulator};
use freshet_actors::stream::{EmbeddedLog, LogConfig, StreamLog};
use freshet_actors::supervisor::Intensity;
use freshet_actors::training::default_table_config;
use freshet_actors::training::feed::ReplayPlan;
use freshet_actors::training::FreshModel;

fn open(root: &Path, topic: &str) -> Arc<dyn StreamLog> {
    let cfg = LogConfig {
        partitions: 2,
        ..LogConfig::default()
    };
    Arc::new(EmbeddedLog::open(root, topic, cfg).expect("log"))
}

fn config(dir: &Path, gate: GateConfig, faults: Faults) -> PipelineConfig {
    let root = dir.join("log");
    let schema = Schema::criteo(4);
    let model = ModelConfig {
        hidden: Some(vec![16]),
        ..ModelConfig::default()
    };
    let tables = Scorer::required_tables(&schema, &model)
        .into_iter()
        .map(|(n, d)| (n, default_table_config(d)))
        .collect();
    PipelineConfig {
        logs: Logs {
            events: open(&root, EVENTS_TOPIC),
            samples: open(&root, SAMPLES_TOPIC),
            dead_letters: open(&root, DEAD_LETTERS_TOPIC),
            sample_rejects: open(&root, SAMPLE_REJECTS_TOPIC),
        },
        store: ModelStore::open(dir.join("models")).expect("store"),
        joiner_dir: dir.join("joiner"),
        // Short windows so negatives flow within a test's seconds.
        join: JoinConfig {
            window_ms: 1_000,
            allowed_lateness_ms: 200,
            ..JoinConfig::default()
        },
        joiner_checkpoint: CheckpointEvery {
            records: 5_000,
            ms: 500,
        },
        joiner_batch: 1024,
        fresh: FreshModel {
            schema,
            model,
            tables,
        },
        shards: 2,
        placer: None,
        spill_dir: None,
        schedule: Schedule {
            every_steps: None,
            every: Some(Duration::from_millis(400)),
            full_every: 10,
            keep_full: 100,
            keep_bytes: None,
        },
        batch: 256,
        threads: 1,
        gate,
        replicas: 1,
        intensity: Intensity {
            max_restarts: 20,
            within: Duration::from_secs(60),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
        },
        faults,
    }
}

fn loose_gate() -> GateConfig {
    GateConfig {
        min_samples: 400,
        max_auc_drop: 0.5,
        max_logloss_ratio: 10.0,
        max_calibration_error: 10.0,
        ..GateConfig::default()
    }
}

/// The simulator, playing live into the event log on its own thread.
struct Feed {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Feed {
    fn start(events: Arc<dyn StreamLog>, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sim = Simulator::new(SimConfig {
                seed,
                users: 300,
                items: 200,
                rate: 1500.0,
                start_ms: freshet_actors::stream::now_ms(),
                click_delay_median_ms: 200.0,
                click_delay_sigma: 0.5,
                malformed_rate: 0.002,
                ..SimConfig::default()
            })
            .expect("simulator");
            play_live(&mut sim, &*events, &s).expect("feeding the event log")
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map_or(0, |t| t.join().expect("feeder"))
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` every 20 ms until it gives `Some`, for at most `secs`.
async fn until<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn validated(store: &ModelStore) -> Vec<(u64, freshet_actors::ckpt::Validation)> {
    store
        .versions()
        .unwrap()
        .into_iter()
        .filter_map(|v| store.manifest(v).ok()?.validation.map(|x| (v, x)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_learns_and_serving_follows_validated_versions() {
    let dir = tempfile::tempdir().unwrap();
    let gate = GateConfig {
        publish: Publish::AfterValidation,
        ..loose_gate()
    };
    let cfg = config(dir.path(), gate, Faults::new());
    let mut feed = Feed::start(cfg.logs.events.clone(), 7);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    // The first served version, and its AUC on the samples after it.
    let (first, first_auc) = until(30, "a first published version", || {
        let store = store.clone();
        let cell = pipe.cells()[0].clone();
        async move {
            let v = cell.version()?;
            let auc = store
                .manifest(v)
                .ok()?
                .validation?
                .metrics
                .get("auc")
                .copied()?;
            Some((v, auc))
        }
    })
    .await;
    // Serving AUC (the served version scored on samples it never trained on) rises clearly.
    let p = pipe.clone();
    let later = until(
        60,
        "serving AUC to rise 0.03 above the first version's",
        move || {
            let p = p.clone();
            async move {
                let s = p.validator_status().await.ok()?;
                let (v, val) = s.last_verdict?;
                let auc = *val.metrics.get("serving_auc")?;
                let served = *val.metrics.get("serving_version")? as u64;
                (served > first && auc >= first_auc + 0.03).then_some((v, served, auc))
            }
        },
    )
    .await;
    eprintln!("first served version {first} auc {first_auc:.4}; later {later:?}");
    let vals = validated(&store);
    assert!(
        vals.iter().all(|(_, v)| v.passed),
        "the loose gate passes all"
    );
    feed.stop();
    let last = pipe.shutdown().await.unwrap();
    assert!(last.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_validation_a_failing_gate_blocks_publication_and_raises_the_alert() {
    let dir = tempfile::tempdir().unwrap();
    // No model is ever perfectly calibrated: every version fails.
    let gate = GateConfig {
        publish: Publish::AfterValidation,
        max_calibration_error: 0.0,
        calibration_min_clicks: 1,
        alert_after: 2,
        ..loose_gate()
    };
    let cfg = config(dir.path(), gate, Faults::new());
    let _feed = Feed::start(cfg.logs.events.clone(), 8);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let p = pipe.clone();
    let status = until(30, "three failed verdicts", move || {
        let p = p.clone();
        async move { p.validator_status().await.ok().filter(|s| s.failed >= 3) }
    })
    .await;
    assert!(status.alert);
    assert_eq!(status.passed, 0);
    assert!(status.consecutive_failures >= 3);
    let vals = validated(pipe.store());
    assert!(vals.len() >= 3);
    for (v, val) in &vals {
        assert!(!val.passed, "version {v} passed");
        assert!(val.reason.as_deref().unwrap().contains("calibration"));
    }
    assert_eq!(pipe.cells()[0].version(), None, "nothing was published");
    let st = pipe.status().await.unwrap();
    assert_eq!(st.replicas[0].publishes, 0);
    pipe.shutdown().await.unwrap();
}

/// Guarded publishing serves each version as it is written, before any verdict: serving
/// follows training at the delta interval, however long verdicts take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_publishing_serves_each_version_before_its_verdict() {
    let dir = tempfile::tempdir().unwrap();
    // Verdicts that take far longer than the test: only publication at once can serve.
    let gate = GateConfig {
        min_samples: 10_000_000,
        window_ms: 3_600_000,
        ..loose_gate()
    };
    let cfg = config(dir.path(), gate, Faults::new());
    let _feed = Feed::start(cfg.logs.events.clone(), 12);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    let cell = pipe.cells()[0].clone();
    let served = until(30, "a version after the fresh model served", || {
        let cell = cell.clone();
        async move { cell.version().filter(|&v| v >= 3) }
    })
    .await;
    let status = pipe.validator_status().await.unwrap();
    assert_eq!(status.evaluated, 0, "no verdict was due");
    // The fresh model (version 1) is written before the validator starts; each later one is
    // published as it arrives.
    assert!(status.published >= 2, "{status:?}");
    assert!(store.manifest(served).unwrap().validation.is_none());
    pipe.shutdown().await.unwrap();
}

/// A gate that fails about every other version (a candidate must beat the last version that
/// passed on the same samples): each failed version is withdrawn, serving goes back to the
/// last one that passed, and nothing newer is served until a candidate passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_publishing_withdraws_a_failed_version_until_a_candidate_passes() {
    let dir = tempfile::tempdir().unwrap();
    // The comparisons with the reference allow for chance, so failures come from a calibration
    // check tighter than a 300-sample window's noise (about 0.1 on its 80-odd clicks): some
    // versions pass it, most fail.
    let gate = GateConfig {
        min_samples: 300,
        max_calibration_error: 0.05,
        calibration_min_clicks: 1,
        alert_after: 1_000,
        ..loose_gate()
    };
    let cfg = config(dir.path(), gate, Faults::new());
    let _feed = Feed::start(cfg.logs.events.clone(), 13);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    let cell = pipe.cells()[0].clone();
    let mut paused_seen = 0;
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = pipe.validator_status().await.unwrap();
        if s.publish_paused {
            // Withdrawn: serving goes back to the reference (once the replica has the
            // message), or to a candidate that passed since.
            let r = s.reference.expect("a withdrawal has a reference");
            let (c, st) = (cell.clone(), store.clone());
            until(5, "the withdrawal to reach serving", move || {
                let (c, st) = (c.clone(), st.clone());
                async move {
                    let v = c.version()?;
                    let passed = st.manifest(v).ok()?.validation.is_some_and(|x| x.passed);
                    (v == r || passed).then_some(())
                }
            })
            .await;
            paused_seen += 1;
        }
        if s.withdrawn >= 2 && s.published > s.withdrawn + 3 && paused_seen > 0 {
            break s;
        }
        assert!(Instant::now() < end, "timed out: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let vals = validated(&store);
    assert!(vals.iter().any(|(_, v)| v.passed), "{vals:?}");
    assert!(vals.iter().any(|(_, v)| !v.passed), "{vals:?}");
    eprintln!(
        "withdrawn {} times; {} publications",
        status.withdrawn, status.published
    );
    pipe.shutdown().await.unwrap();
}

/// Sum of a version's offsets, and its samples accounted for.
fn accounted(store: &ModelStore, v: u64) -> (u64, u64) {
    let m = store.manifest(v).unwrap();
    // Replays are on top of live consumption (this accounting holds for the version that
    // records them; the test calls it only there or where there was none).
    let replayed: u64 = m
        .replays
        .iter()
        .map(|r| (r.to - r.from) - r.skip.map_or(0, |(a, b)| b - a))
        .sum();
    (
        m.sample_offsets.values().sum::<u64>(),
        m.rows_trained + m.samples_rejected - replayed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_switches_serving_and_rewinds_the_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), loose_gate(), Faults::new());
    let _feed = Feed::start(cfg.logs.events.clone(), 9);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    let cell = pipe.cells()[0].clone();
    let target = until(30, "a published version", || {
        let cell = cell.clone();
        async move { cell.version() }
    })
    .await;
    let c = cell.clone();
    until(30, "two more published versions", move || {
        let c = c.clone();
        async move { c.version().filter(|&v| v >= target + 2) }
    })
    .await;
    let before = pipe.trainer_status().await.unwrap();
    let newest = store.latest().unwrap().unwrap();
    let target_offsets = store.manifest(target).unwrap().sample_offsets;
    pipe.rollback(target).await.unwrap();
    // Serving switched at once; the trainer restarted from the target's state and offsets.
    assert_eq!(cell.version(), Some(target));
    let after = pipe.trainer_status().await.unwrap();
    assert_eq!(after.started_from, Some(target));
    // It started where the target stopped, behind where it was; by now it may have caught up.
    assert_eq!(after.start_offsets, target_offsets);
    assert!(target_offsets.values().sum::<u64>() < before.offsets.values().sum::<u64>());
    for (p, o) in &after.offsets {
        assert!(*o >= target_offsets[p]);
    }
    // Later versions are kept, marked; the newest live one is the target.
    for v in (target + 1)..=newest {
        if let Ok(m) = store.manifest(v) {
            assert_eq!(
                m.rolled_back.as_ref().map(|r| r.to),
                Some(target),
                "version {v}"
            );
        }
    }
    // The next version descends from the target and accounts for every offset it consumed.
    let next = until(30, "a version after the rollback", || {
        let store = store.clone();
        async move { store.latest_live().ok()?.filter(|&v| v > newest) }
    })
    .await;
    let m = store.manifest(next).unwrap();
    assert!(m.rolled_back.is_none());
    assert!(m.step > store.manifest(target).unwrap().step);
    let (offsets, rows) = accounted(&store, next);
    let (t_off, t_rows) = accounted(&store, target);
    assert_eq!(offsets - t_off, rows - t_rows);
    // Rolling back to history, or to nothing, is refused with the reason.
    let e = pipe.rollback(newest).await.unwrap_err().to_string();
    assert!(e.contains("history"), "{e}");
    let e = pipe.rollback(10_000).await.unwrap_err().to_string();
    assert!(e.contains("10000"), "{e}");
    pipe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_re_consumes_exactly_the_requested_range() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), loose_gate(), Faults::new());
    let samples = cfg.logs.samples.clone();
    let _feed = Feed::start(cfg.logs.events.clone(), 10);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    let s = samples.clone();
    until(30, "600 samples in partition 0", move || {
        let s = s.clone();
        async move { (s.high_watermark(0).ok()? >= 600).then_some(()) }
    })
    .await;
    let before = store.latest().unwrap().unwrap();
    let plan = ReplayPlan {
        partition: 0,
        from: 100,
        to: 500,
        skip: Some((200, 250)),
    };
    pipe.replay(plan.clone()).await.unwrap();
    let version = until(30, "a version recording the replay", || {
        let store = store.clone();
        async move {
            let v = store.latest().ok()??;
            (v > before && !store.manifest(v).ok()?.replays.is_empty()).then_some(v)
        }
    })
    .await;
    let m = store.manifest(version).unwrap();
    assert_eq!(m.replays.len(), 1);
    let r = &m.replays[0];
    assert_eq!(
        (r.partition, r.from, r.to, r.skip),
        (0, 100, 500, Some((200, 250)))
    );
    // Exactly the range minus the skip, less what the trainer refused in it.
    let rejected_in_range = {
        let recs = samples.read(0, 100, 400).unwrap();
        recs.iter()
            .filter(|r| !(200..250).contains(&r.offset))
            .filter(|r| JoinedSample::from_msgpack(&r.payload).is_err())
            .count() as u64
    };
    assert_eq!(r.rows + rejected_in_range, 350);
    // And the live accounting is unchanged by it: replayed rows are on top.
    let (offsets, rows) = accounted(&store, version);
    assert_eq!(offsets, rows);
    let e = pipe
        .replay(ReplayPlan {
            partition: 0,
            from: 0,
            to: 1 << 40,
            skip: None,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the retained"), "{e}");
    pipe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_installs_the_base_model_and_its_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), loose_gate(), Faults::new());
    let _feed = Feed::start(cfg.logs.events.clone(), 11);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    let s = store.clone();
    let v = until(30, "three versions", move || {
        let s = s.clone();
        async move { s.latest().ok()?.filter(|&v| v >= 3) }
    })
    .await;
    // A base model with recorded sample-log offsets (as `freshet train --from-log` writes):
    // here version v, copied into a store of its own.
    let base_dir = dir.path().join("base");
    let base = ModelStore::open(&base_dir).unwrap();
    let r = store.restore(v, None).unwrap();
    let m = r.manifest.clone();
    base.write(
        freshet_actors::ckpt::VersionMeta {
            step: m.step,
            rows_trained: m.rows_trained,
            samples_rejected: m.samples_rejected,
            replays: Vec::new(),
            calibrated_from: None,
            sample_offsets: m.sample_offsets.clone(),
            joiner_offsets: m.joiner_offsets.clone(),
            model: m.model.clone(),
            schema: m.schema.clone(),
            tables: m.tables.clone(),
            placement: None,
        },
        &r.dense,
        &freshet_actors::ckpt::Payload::Full(r.shards),
    )
    .unwrap();
    let installed = pipe.calibrate(base_dir.clone(), None).await.unwrap();
    let im = store.manifest(installed).unwrap();
    let src = im.calibrated_from.as_ref().unwrap();
    assert_eq!((src.store.as_path(), src.version), (base_dir.as_path(), 1));
    assert_eq!(im.sample_offsets, m.sample_offsets);
    assert_eq!(im.step, m.step);
    let t = pipe.trainer_status().await.unwrap();
    assert_eq!(t.started_from, Some(installed));
    for (p, o) in &t.offsets {
        assert!(*o >= m.sample_offsets[p]);
    }
    // Training goes on from the base: the next version descends from it.
    let next = until(30, "a version after the calibration", || {
        let store = store.clone();
        async move { store.latest().ok()?.filter(|&x| x > installed) }
    })
    .await;
    let (offsets, rows) = accounted(&store, next);
    assert_eq!(offsets, rows);
    // A base without offsets has nowhere to resume from.
    let bare_dir = dir.path().join("bare");
    let bare = ModelStore::open(&bare_dir).unwrap();
    let r = store.restore(v, None).unwrap();
    let mut meta = freshet_actors::ckpt::VersionMeta {
        step: 0,
        rows_trained: 0,
        samples_rejected: 0,
        replays: Vec::new(),
        calibrated_from: None,
        sample_offsets: Default::default(),
        joiner_offsets: Default::default(),
        model: m.model.clone(),
        schema: m.schema.clone(),
        tables: m.tables.clone(),
        placement: None,
    };
    bare.write(
        meta.clone(),
        &r.dense,
        &freshet_actors::ckpt::Payload::Full(r.shards),
    )
    .unwrap();
    let e = pipe
        .calibrate(bare_dir, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--from-log"), "{e}");
    // Nor does one from another log.
    meta.sample_offsets.insert(0, 1 << 40);
    let far_dir = dir.path().join("far");
    let r = store.restore(v, None).unwrap();
    ModelStore::open(&far_dir)
        .unwrap()
        .write(
            meta,
            &r.dense,
            &freshet_actors::ckpt::Payload::Full(r.shards),
        )
        .unwrap();
    let e = pipe.calibrate(far_dir, None).await.unwrap_err().to_string();
    assert!(e.contains("another log"), "{e}");
    pipe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_each_actor_kind_is_recovered_with_no_sample_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let cfg = config(dir.path(), loose_gate(), faults.clone());
    let logs = cfg.logs.clone();
    let mut feed = Feed::start(cfg.logs.events.clone(), 12);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let cell = pipe.cells()[0].clone();
    until(30, "a published version", || {
        let cell = cell.clone();
        async move { cell.version() }
    })
    .await;
    for (point, child) in [
        ("joiner.step", "joiner-"),
        ("shard.apply", "shard-"),
        ("writer.write", "writer"),
        ("trainer.batch", "trainer"),
        ("validator.candidate", "validator"),
        ("replica.publish", "replica-"),
    ] {
        let restarts = |st: &[freshet_actors::supervisor::ChildStatus]| -> u64 {
            st.iter()
                .filter(|c| c.name.starts_with(child))
                .map(|c| c.restarts)
                .sum()
        };
        let before = restarts(&pipe.status().await.unwrap().children);
        faults.arm(point, 0, 1);
        let (p, f) = (pipe.clone(), faults.clone());
        until(
            30,
            &format!("recovery from a panic at {point}"),
            move || {
                let (p, f) = (p.clone(), f.clone());
                async move {
                    let st = p.status().await.ok()?;
                    let all_up = st.children.iter().all(|c| c.running);
                    (f.fired(point) == 1 && all_up && restarts(&st.children) > before).then_some(())
                }
            },
        )
        .await;
        eprintln!("recovered from a panic at {point}");
    }
    // Training still moves forward after all of that.
    let v = pipe.store().latest().unwrap().unwrap();
    let s = pipe.store().clone();
    until(30, "a new version after the faults", move || {
        let s = s.clone();
        async move { s.latest().ok()?.filter(|&x| x > v) }
    })
    .await;
    feed.stop();
    // Drain: the joiners read every event, the trainer every sample.
    let (p, l) = (pipe.clone(), logs.clone());
    until(30, "the pipeline to drain", move || {
        let (p, l) = (p.clone(), l.clone());
        async move {
            let st = p.status().await.ok()?;
            let joined = st.joiners.len() == 2
                && st.joiners.iter().all(|j| {
                    l.events
                        .high_watermark(j.partition)
                        .is_ok_and(|h| j.input_next >= h)
                });
            (joined && st.trainer?.lag == Some(0)).then_some(())
        }
    })
    .await;
    let last = pipe.shutdown().await.unwrap().unwrap();
    let store = pipe.store();
    let (offsets, rows) = accounted(store, last);
    let in_log: u64 = (0..2)
        .map(|p| logs.samples.high_watermark(p).unwrap())
        .sum();
    assert_eq!(offsets, in_log, "every sample consumed");
    assert_eq!(
        rows, offsets,
        "each applied once: rows trained + refused = offsets"
    );
    // The joiners wrote each impression's first sample once.
    let mut seen = BTreeSet::new();
    for p in 0..2 {
        let n = logs.samples.high_watermark(p).unwrap();
        let mut at = 0;
        while at < n {
            let recs = logs.samples.read(p, at, 4096).unwrap();
            at = recs.last().unwrap().offset + 1;
            for r in recs {
                let s = JoinedSample::from_msgpack(&r.payload).unwrap();
                if s.kind != SampleKind::Correction {
                    assert!(seen.insert((s.request_id, s.item)), "a doubled sample");
                }
            }
        }
    }
    assert!(!seen.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_ten_times_faster_than_training_grows_the_log_not_a_mailbox() {
    use freshet_actors::event::{Features, Snapshot};
    use freshet_actors::sample::json::{RawField, RawValue};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), loose_gate(), Faults::new());
    // A wide dense net makes each step cost, so a paced producer is far ahead with a small log.
    cfg.fresh.model.hidden = Some(vec![512, 512]);
    let samples = cfg.logs.samples.clone();
    let batch = cfg.batch;
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    // Samples straight into the sample log, as fast as one thread appends them.
    let stop = Arc::new(AtomicBool::new(false));
    let (s, log) = (stop.clone(), samples.clone());
    // Encoded once and appended again and again: appending costs next to nothing, training
    // each of these rows (26 fields, 13 dense features) costs real work.
    let recs: Vec<Vec<u8>> = (0..512u64)
        .map(|i| {
            let mut f = Features::default();
            for d in 1..=13 {
                f.dense.insert(format!("I{d}"), (i % (d + 3)) as f64);
            }
            for c in 1..=26 {
                f.sparse.insert(
                    format!("C{c}"),
                    RawField::One(RawValue::Str(format!("v{}", (i * c) % 211))),
                );
            }
            JoinedSample {
                request_id: format!("r{i}"),
                item: "a".into(),
                user: "u".into(),
                impression_time_ms: 0,
                kind: SampleKind::Negative,
                labels: [("click".to_owned(), f64::from(u8::from(i % 7 == 0)))].into(),
                weight: 1.0,
                features: Snapshot::encode(&f),
            }
            .to_msgpack()
        })
        .collect();
    let producer = std::thread::spawn(move || {
        let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            log.append(((n / 512) % 2) as u32, &refs).unwrap();
            n += 512;
            // About 200k samples/s at most.
            std::thread::sleep(Duration::from_micros(2500));
        }
        n
    });
    let started = Instant::now();
    let mut slowest_status = Duration::ZERO;
    let mut last;
    // Until the producer is 12x ahead (and at least a second), so the log stays small.
    loop {
        let t = Instant::now();
        let st = pipe.trainer_status().await.unwrap();
        slowest_status = slowest_status.max(t.elapsed());
        let ahead = st.lag.is_some_and(|lag| lag >= 11 * st.rows_trained.max(1));
        last = Some(st);
        if (ahead && started.elapsed() >= Duration::from_secs(1))
            || started.elapsed() >= Duration::from_secs(20)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let produced = producer.join().unwrap();
    let st = last.unwrap();
    eprintln!(
        "produced {produced}, trained {}, lag {:?}, slowest status reply {slowest_status:?}",
        st.rows_trained, st.lag
    );
    // The producer ran at least 10x ahead; the backlog is in the log (on disk), and the
    // trainer still takes one batch at a time and answers at once.
    assert!(produced >= 10 * st.rows_trained, "producer not 10x faster");
    assert!(st.lag.is_some_and(|lag| lag >= 9 * st.rows_trained));
    let bytes: u64 = std::fs::read_dir(dir.path().join("log").join(SAMPLES_TOPIC))
        .map(|d| d.flatten().map(|e| walk(&e.path())).sum())
        .unwrap_or(0);
    eprintln!("sample log: {} MB", bytes >> 20);
    assert!(st.max_step_rows <= batch);
    assert!(
        slowest_status < Duration::from_secs(1),
        "{slowest_status:?}"
    );
    pipe.shutdown().await.unwrap();
}

fn walk(p: &Path) -> u64 {
    match std::fs::read_dir(p) {
        Ok(d) => d.flatten().map(|e| walk(&e.path())).sum(),
        Err(_) => std::fs::metadata(p).map_or(0, |m| m.len()),
    }
}

/// A byte bound below any version's size: retention keeps only the newest version and the
/// pinned ones, and deletes versions while the validator reads and scores them. The validator
/// pins what it scores and what passed, takes a version deleted under it as skipped, and is
/// never restarted for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validator_keeps_judging_while_retention_deletes_versions_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), loose_gate(), Faults::new());
    cfg.schedule = Schedule {
        every_steps: None,
        every: Some(Duration::from_millis(100)),
        full_every: 3,
        keep_full: 1,
        keep_bytes: Some(1),
    };
    let mut feed = Feed::start(cfg.logs.events.clone(), 23);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    let p = pipe.clone();
    let st = until(90, "ten verdicts with versions deleted", move || {
        let (p, store) = (p.clone(), store.clone());
        async move {
            let s = p.validator_status().await.ok()?;
            let oldest = *store.versions().ok()?.first()?;
            (s.passed + s.failed >= 10 && oldest > 5).then_some(s)
        }
    })
    .await;
    let status = pipe.status().await.unwrap();
    let validator = status
        .children
        .iter()
        .find(|c| c.name == "validator")
        .unwrap();
    assert_eq!(validator.restarts, 0, "{validator:?}");
    let store = pipe.store();
    let pins = store.pins().unwrap();
    let passed = st.last_passed.expect("a version passed");
    assert!(
        pins.get("validator-passed").is_some_and(|&v| v >= passed),
        "{pins:?} {st:?}"
    );
    // The newest version that passed is still there to withdraw or roll back to.
    let v = pins["validator-passed"];
    assert!(store.manifest(v).unwrap().validation.unwrap().passed);
    eprintln!(
        "{} verdicts, {} skipped; the store holds {:?}",
        st.passed + st.failed,
        st.skipped,
        store.versions().unwrap()
    );
    feed.stop();
    pipe.shutdown().await.unwrap();
}
