//! The supervised pipeline in one process, on the embedded log, fed live by the simulator:
//! learning, the validation gate, rollback, replay, calibration, and a panic in each actor
//! kind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_actors::ckpt::writer::Schedule;
use freshet_actors::ckpt::ModelStore;
use freshet_actors::dense::ModelConfig;
use freshet_actors::event::{
    JoinedSample, SampleKind, DEAD_LETTERS_TOPIC, EVENTS_TOPIC, SAMPLES_TOPIC,
    SAMPLE_REJECTS_TOPIC,
};
use freshet_actors::fault::Faults;
use freshet_actors::joiner::{CheckpointEvery, JoinConfig};
use freshet_actors::online::feed::ReplayPlan;
use freshet_actors::online::gate::GateConfig;
use freshet_actors::online::pipeline::{Logs, PipelineConfig, PipelineHandle};
use freshet_actors::online::trainer::FreshModel;
use freshet_actors::sample::Schema;
use freshet_actors::simulate::{play_live, SimConfig, Simulator};
use freshet_actors::stream::{EmbeddedLog, LogConfig, StreamLog};
use freshet_actors::supervisor::Intensity;
use freshet_actors::trainer::{default_table_config, Trainer};

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
    let tables = Trainer::required_tables(&schema, &model)
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
        spill_dir: None,
        schedule: Schedule {
            every_steps: None,
            every: Some(Duration::from_millis(400)),
            full_every: 10,
            keep_full: 100,
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
    let cfg = config(dir.path(), loose_gate(), Faults::new());
    let mut feed = Feed::start(cfg.logs.events.clone(), 7);
    let (pipe, _j) = PipelineHandle::start(cfg).await.unwrap();
    let store = pipe.store().clone();
    // The first served version, and its AUC on the samples after it.
    let (first, first_auc) = until(30, "a first published version", || {
        let store = store.clone();
        let cell = pipe.cells()[0].clone();
        async move {
            let v = cell.version()?;
            let auc = store.manifest(v).ok()?.validation?.metrics.get("auc").copied()?;
            Some((v, auc))
        }
    })
    .await;
    // Serving AUC (the served version scored on samples it never trained on) rises clearly.
    let p = pipe.clone();
    let later = until(60, "serving AUC to rise 0.03 above the first version's", move || {
        let p = p.clone();
        async move {
            let s = p.validator_status().await.ok()?;
            let (v, val) = s.last_verdict?;
            let auc = *val.metrics.get("serving_auc")?;
            let served = *val.metrics.get("serving_version")? as u64;
            (served > first && auc >= first_auc + 0.03).then_some((v, served, auc))
        }
    })
    .await;
    eprintln!("first served version {first} auc {first_auc:.4}; later {later:?}");
    let vals = validated(&store);
    assert!(vals.iter().all(|(_, v)| v.passed), "the loose gate passes all");
    feed.stop();
    let last = pipe.shutdown().await.unwrap();
    assert!(last.is_some());
}
