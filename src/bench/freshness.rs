//! `freshet bench freshness`: how long after a click is appended does serving answer with a
//! version that has learned from it.
//!
//! A node runs as `freshet dev` does, in a temporary data directory, while the simulator plays
//! `--events-per-sec` live. For every click the bench records when its event was appended; a
//! watcher records when the replica's cell first served each version. Afterwards each click is
//! followed to its sample (the joiner writes the positive when the click arrives), the sample's
//! offset to the first version whose offsets include it, and that version to the first time a
//! version at least as new was served. Freshness is that time minus the click's append time.
//! The first `--warmup-secs` are left out (the first versions wait for a first verdict).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use freshet_actors::event::{Event, JoinedSample, SampleKind};
use freshet_actors::online::pipeline::PipelineHandle;
use freshet_actors::simulate::{SimConfig, Simulator};
use freshet_actors::stream::{now_ms, partition_of};
use serde::Serialize;

use crate::settings::Settings;

/// (request id, item) of each click -> when its event was appended (Unix ms).
type ClickTimes = HashMap<(String, String), i64>;

#[derive(Debug, Args)]
pub(crate) struct FreshnessArgs {
    /// Events (impressions and clicks) appended per second.
    #[arg(long, default_value_t = 10_000.0)]
    events_per_sec: f64,
    /// Version interval (the delta interval), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    delta_ms: u64,
    #[arg(long, default_value_t = 30)]
    secs: u64,
    #[arg(long, default_value_t = 8)]
    warmup_secs: u64,
    /// Samples the validator scores before each verdict (fewer: fresher, noisier verdicts).
    #[arg(long, default_value_t = 500)]
    min_samples: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct FreshnessReport {
    events_per_sec: f64,
    clicks_per_event: f64,
    delta_ms: u64,
    clicks_measured: usize,
    clicks_not_yet_served: usize,
    freshness_p50_ms: Option<f64>,
    freshness_p90_ms: Option<f64>,
    freshness_p99_ms: Option<f64>,
    versions_written: usize,
    versions_served: usize,
    min_samples: u64,
    samples_per_sec_trained: f64,
}

pub(crate) fn run(args: FreshnessArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events_per_sec > 0.0,
        "--events-per-sec must be positive"
    );
    anyhow::ensure!(
        args.secs > args.warmup_secs,
        "--secs must exceed --warmup-secs"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(bench(args, settings))
}

async fn bench(args: FreshnessArgs, settings: &Settings) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("a temporary data directory")?;
    let mut s = settings.clone();
    s.node.data_dir = dir.path().to_path_buf();
    s.validation.min_samples = args.min_samples;
    // The join window only delays negatives; clicks join at once whatever it is.
    let cfg = crate::settings::pipeline_config(&s, 5_000, args.delta_ms, 1)?;
    let events = cfg.logs.events.clone();
    let samples = cfg.logs.samples.clone();
    let (pipe, _join) = PipelineHandle::start(cfg).await?;

    // The watcher: when each version was first served.
    let served: Arc<Mutex<BTreeMap<u64, i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (cell, served, stop) = (pipe.cells()[0].clone(), served.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = cell.version() {
                    let mut m = served.lock().unwrap_or_else(|p| p.into_inner());
                    m.entry(v).or_insert_with(now_ms);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // The producer: the simulator at the requested rate; clicks' append times recorded.
    let producer = {
        let (log, stop) = (events.clone(), stop.clone());
        // Impressions set the simulator's pace; at its default click rates about one event
        // in six is a click (the report gives the measured rate).
        let rate = args.events_per_sec / 1.2;
        std::thread::spawn(move || -> anyhow::Result<(u64, ClickTimes)> {
            let mut sim = Simulator::new(SimConfig {
                seed: 99,
                rate,
                start_ms: now_ms(),
                click_delay_median_ms: 500.0,
                click_delay_sigma: 0.7,
                ..SimConfig::default()
            })?;
            let parts = log.partitions();
            let (mut recs, mut truth) = (Vec::new(), Vec::new());
            let mut clicks = HashMap::new();
            let mut appended = 0u64;
            let mut pending: Vec<Vec<Vec<u8>>> = vec![Vec::new(); parts as usize];
            let mut pending_clicks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let now = now_ms();
                while sim.clock_ms() <= now {
                    sim.next_request(&mut recs, &mut truth);
                    truth.clear();
                    for r in recs.drain(..) {
                        if let Ok(Event::Action(a)) = Event::from_msgpack(&r.payload) {
                            pending_clicks.push((a.request_id, a.item));
                        }
                        pending[partition_of(&r.key, parts) as usize].push(r.payload);
                    }
                }
                for (p, batch) in pending.iter_mut().enumerate() {
                    if !batch.is_empty() {
                        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                        log.append(p as u32, &refs)?;
                        appended += batch.len() as u64;
                        batch.clear();
                    }
                }
                let at = now_ms();
                for c in pending_clicks.drain(..) {
                    clicks.entry(c).or_insert(at);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok((appended, clicks))
        })
    };
    let started = now_ms();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let trained = pipe
        .trainer_status()
        .await
        .map(|t| t.samples_per_sec)
        .unwrap_or(0.0);
    stop.store(true, Ordering::SeqCst);
    let (appended, clicks) = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the producer panicked"))??;
    let _ = watcher.join();
    pipe.shutdown().await?;
    let elapsed_s = (now_ms() - started) as f64 / 1000.0;

    // Versions: their offsets, and when a version at least as new was first served.
    let store = pipe.store();
    let mut offsets: Vec<(u64, BTreeMap<u32, u64>)> = Vec::new();
    for v in store.versions()? {
        let m = store.manifest(v)?;
        if m.rolled_back.is_none() {
            offsets.push((v, m.sample_offsets));
        }
    }
    let served = served.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let first_served_at_least = |v: u64| served.range(v..).map(|(_, &t)| t).min();
    let mut lat = Vec::new();
    let mut not_served = 0;
    let warm_end = started + (args.warmup_secs * 1000) as i64;
    for p in 0..samples.partitions() {
        let high = samples.high_watermark(p)?;
        let mut at = samples.low_watermark(p)?;
        while at < high {
            let recs = samples.read(p, at, 4096)?;
            let Some(last) = recs.last() else { break };
            at = last.offset + 1;
            for r in recs {
                let Ok(s) = JoinedSample::from_msgpack(&r.payload) else {
                    continue;
                };
                if s.kind != SampleKind::Positive {
                    continue;
                }
                let Some(&clicked) = clicks.get(&(s.request_id, s.item)) else {
                    continue;
                };
                if clicked < warm_end {
                    continue;
                }
                let first = offsets
                    .iter()
                    .find(|(_, o)| o.get(&p).is_some_and(|&x| x > r.offset))
                    .map(|(v, _)| *v);
                match first.and_then(first_served_at_least) {
                    Some(t) => lat.push((t - clicked).max(0) as f64),
                    None => not_served += 1,
                }
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    let q = |f: f64| -> Option<f64> {
        (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * f).round() as usize])
    };
    let report = FreshnessReport {
        events_per_sec: appended as f64 / elapsed_s.max(1e-9),
        clicks_per_event: clicks.len() as f64 / appended.max(1) as f64,
        delta_ms: args.delta_ms,
        clicks_measured: lat.len(),
        clicks_not_yet_served: not_served,
        freshness_p50_ms: q(0.5),
        freshness_p90_ms: q(0.9),
        freshness_p99_ms: q(0.99),
        versions_written: offsets.len(),
        versions_served: served.len(),
        min_samples: args.min_samples,
        samples_per_sec_trained: trained,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
