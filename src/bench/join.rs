//! `freshet bench join`: the SampleJoiner end to end through the embedded log.
//!
//! - **Throughput:** simulated traffic (pre-generated, so the simulator's cost is not timed) is
//!   appended to the event log as fast as one producer thread can, while one joiner actor per
//!   partition joins it and appends samples and dead letters. Timed from the first append until
//!   every joiner has consumed the whole log: impressions per second, end to end.
//! - **Latency:** the same traffic paced at `--latency-rate` impressions per second. For every
//!   positive sample, the time from appending its click to the sample's append being visible to
//!   a tailing reader.
//!
//! The baseline in the same run is the raw embedded log: the same records appended and read
//! back with no joining, which bounds what the joiner can reach on this machine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use freshet_actors::event::{Event, SampleKind};
use freshet_actors::joiner::{CheckpointEvery, JoinArgs, JoinConfig, JoinerHandle};
use freshet_actors::simulate::{SimConfig, Simulator};
use freshet_actors::stream::{partition_of, StreamLog};
use serde::{Deserialize, Serialize};

use crate::settings::Settings;
use freshet_actors::topics::{open_topics, Topics};

#[derive(Debug, Args)]
pub(crate) struct JoinBenchArgs {
    /// Impressions in the throughput run.
    #[arg(long, default_value_t = 400_000)]
    impressions: u64,
    /// Event-log partitions (one joiner each).
    #[arg(long, default_value_t = 2)]
    partitions: u32,
    /// Share of impressions that get a click.
    #[arg(long, default_value_t = 0.10)]
    ctr: f64,
    /// Impressions per second in the latency run.
    #[arg(long, default_value_t = 50_000.0)]
    latency_rate: f64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5.0)]
    latency_secs: f64,
    /// Sparse fields in each impression's feature snapshot (Criteo layout has 26).
    #[arg(long, default_value_t = 26)]
    fields: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct JoinBenchReport {
    impressions: u64,
    events: u64,
    clicks: u64,
    partitions: u32,
    snapshot_fields: usize,
    mean_event_bytes: f64,
    fsync: String,
    impressions_per_sec: f64,
    events_per_sec: f64,
    samples: u64,
    /// The raw log with the same records: append, then read everything back.
    baseline_log_events_per_sec: f64,
    /// `events_per_sec / baseline_log_events_per_sec`.
    ratio_to_log: f64,
    latency_rate: f64,
    latency_positives: u64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
}

/// `(partition, payload, click key)`; the key is set for click actions.
type TrafficRecord = (u32, Vec<u8>, Option<(String, String)>);

struct Traffic {
    records: Vec<TrafficRecord>,
    impressions: u64,
    clicks: u64,
}

/// `faults`: the simulator's default duplicate, out-of-order and malformed rates; without them
/// every click follows its impression, so a latency is the pipeline's own and not the wait for
/// an impression the simulator held back.
fn traffic(
    args: &JoinBenchArgs,
    impressions: u64,
    rate: f64,
    seed: u64,
    faults: bool,
) -> anyhow::Result<Traffic> {
    let defaults = SimConfig::default();
    let f = if faults { 1.0 } else { 0.0 };
    // A base click rate of ~25% comes from the hidden model; scale it to the asked one.
    let scale = (args.ctr / 0.256).clamp(1e-6, 1.0);
    let mut sim = Simulator::new(SimConfig {
        seed,
        rate,
        start_ms: freshet_actors::stream::now_ms() - (impressions as f64 / rate * 1000.0) as i64,
        click_scale: scale,
        duplicate_rate: defaults.duplicate_rate * f,
        out_of_order_rate: defaults.out_of_order_rate * f,
        malformed_rate: defaults.malformed_rate * f,
        ..defaults.clone()
    })?;
    let (mut out, mut truth) = (Vec::new(), Vec::new());
    while sim.stats().impressions < impressions {
        sim.next_request(&mut out, &mut truth);
        truth.clear();
    }
    sim.finish(&mut out);
    let mut records = Vec::with_capacity(out.len());
    for r in out {
        let p = partition_of(&r.key, args.partitions);
        let mut payload = r.payload;
        let mut key = None;
        match Event::from_msgpack(&payload) {
            Ok(Event::Action(a)) => key = Some((a.request_id, a.item)),
            Ok(Event::Impression(mut i)) if args.fields < 26 => {
                let keep: Vec<String> = (1..=args.fields).map(|f| format!("C{f}")).collect();
                let mut f = i.features.decode()?;
                f.sparse.retain(|k, _| keep.contains(k));
                i.features = freshet_actors::event::Snapshot::encode(&f);
                payload = Event::Impression(i).to_msgpack();
            }
            _ => {}
        }
        records.push((p, payload, key));
    }
    Ok(Traffic {
        records,
        impressions: sim.stats().impressions,
        clicks: sim.stats().clicks,
    })
}

fn join_args(topics: &Topics, dir: &std::path::Path, p: u32) -> JoinArgs {
    JoinArgs {
        partition: p,
        events: topics.events.clone(),
        samples: topics.samples.clone(),
        dead_letters: topics.dead_letters.clone(),
        checkpoint_dir: dir.join("joiner"),
        config: JoinConfig::default(),
        checkpoint_every: CheckpointEvery::default(),
        group: "bench".into(),
        batch: 4096,
        faults: Default::default(),
    }
}

fn append_all(
    log: &dyn StreamLog,
    records: &[TrafficRecord],
    partitions: u32,
) -> anyhow::Result<()> {
    let mut batches: Vec<Vec<&[u8]>> = vec![Vec::new(); partitions as usize];
    for chunk in records.chunks(4096) {
        for (p, payload, _) in chunk {
            batches[*p as usize].push(payload);
        }
        for (p, b) in batches.iter_mut().enumerate() {
            if !b.is_empty() {
                log.append(p as u32, b)?;
                b.clear();
            }
        }
    }
    Ok(())
}

pub(crate) fn run(args: JoinBenchArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(args.partitions >= 1, "--partitions must be at least 1");
    anyhow::ensure!(args.fields <= 26, "--fields is at most 26");
    anyhow::ensure!(
        args.ctr > 0.0 && args.ctr <= 0.25,
        "--ctr must be in (0, 0.25]"
    );
    let mut log_cfg = settings.log.clone();
    log_cfg.partitions = args.partitions;
    eprintln!("bench join: generating {} impressions", args.impressions);
    let t = traffic(&args, args.impressions, 100_000.0, 1, true)?;
    let bytes: usize = t.records.iter().map(|r| r.1.len()).sum();
    let events = t.records.len() as u64;

    // Baseline: the raw log, same records, append then read back.
    let base_dir = tempfile::tempdir().context("creating a temporary directory")?;
    let base = open_topics(base_dir.path(), &log_cfg)?;
    let start = Instant::now();
    append_all(&*base.events, &t.records, args.partitions)?;
    let mut read = 0u64;
    for p in 0..args.partitions {
        let hw = base.events.high_watermark(p)?;
        let mut at = 0;
        while at < hw {
            let got = base.events.read(p, at, 4096)?;
            at = got.last().map_or(hw, |r| r.offset + 1);
            read += got.len() as u64;
        }
    }
    anyhow::ensure!(read == events, "baseline read {read} of {events} records");
    let baseline = events as f64 / start.elapsed().as_secs_f64();
    drop(base);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    eprintln!("bench join: throughput run");
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let topics = open_topics(dir.path(), &log_cfg)?;
    let (elapsed, samples) = rt.block_on(async {
        let mut joiners = Vec::new();
        for p in 0..args.partitions {
            joiners.push(JoinerHandle::spawn(join_args(&topics, dir.path(), p)).await?);
        }
        let start = Instant::now();
        let events_log = topics.events.clone();
        let records = &t.records;
        std::thread::scope(|s| -> anyhow::Result<()> {
            s.spawn(|| append_all(&*events_log, records, args.partitions))
                .join()
                .map_err(|_| anyhow::anyhow!("producer panicked"))?
        })?;
        loop {
            let mut done = true;
            for (p, (h, _)) in joiners.iter().enumerate() {
                done &= h.stats().await?.input_next >= topics.events.high_watermark(p as u32)?;
            }
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let mut samples = 0;
        for (h, j) in joiners {
            samples += h.stats().await?.samples_next;
            h.stop(j).await;
        }
        anyhow::Ok((elapsed, samples))
    })?;
    drop(topics);

    eprintln!(
        "bench join: latency run at {} impressions/s",
        args.latency_rate
    );
    let n = (args.latency_rate * args.latency_secs) as u64;
    let lt = traffic(&args, n, args.latency_rate, 2, false)?;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let topics = open_topics(dir.path(), &log_cfg)?;
    let appended: Arc<Mutex<HashMap<(String, String), Instant>>> = Arc::default();
    let latencies = rt.block_on(async {
        let mut joiners = Vec::new();
        for p in 0..args.partitions {
            joiners.push(JoinerHandle::spawn(join_args(&topics, dir.path(), p)).await?);
        }
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // One tailing reader per sample partition, as a trainer would follow the log.
        let mut readers = Vec::new();
        for p in 0..args.partitions {
            let log = topics.samples.clone();
            let appended = appended.clone();
            let done = done.clone();
            readers.push(std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                #[derive(Deserialize)]
                struct Head {
                    request_id: String,
                    item: String,
                    kind: SampleKind,
                }
                let mut lat = Vec::new();
                let mut at = 0;
                loop {
                    let hw = log.wait_for(p, at, Duration::from_millis(50))?;
                    if hw == at {
                        if done.load(std::sync::atomic::Ordering::SeqCst) {
                            return Ok(lat);
                        }
                        continue;
                    }
                    let now = Instant::now();
                    for r in log.read(p, at, 10_000)? {
                        at = r.offset + 1;
                        let h: Head = rmp_serde::from_slice(&r.payload)?;
                        if h.kind == SampleKind::Positive {
                            let sent = appended
                                .lock()
                                .map_err(|_| anyhow::anyhow!("lock poisoned"))?
                                .get(&(h.request_id, h.item))
                                .copied();
                            if let Some(sent) = sent {
                                lat.push(now.saturating_duration_since(sent).as_secs_f64() * 1e3);
                            }
                        }
                    }
                }
            }));
        }
        // Paced producer: every millisecond, append what the rate says is due.
        let start = Instant::now();
        let total = lt.records.len();
        let per_ms = total as f64 / (args.latency_secs * 1000.0);
        let mut sent = 0usize;
        let mut batches: Vec<Vec<&[u8]>> = vec![Vec::new(); args.partitions as usize];
        let mut keys = Vec::new();
        while sent < total {
            let due = ((start.elapsed().as_secs_f64() * 1000.0 * per_ms) as usize + 1).min(total);
            for (p, payload, key) in &lt.records[sent..due] {
                batches[*p as usize].push(payload);
                if let Some(k) = key {
                    keys.push(k.clone());
                }
            }
            sent = due;
            for (p, b) in batches.iter_mut().enumerate() {
                if !b.is_empty() {
                    topics.events.append(p as u32, b)?;
                    b.clear();
                }
            }
            let now = Instant::now();
            {
                let mut m = appended
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock poisoned"))?;
                for k in keys.drain(..) {
                    m.entry(k).or_insert(now);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Let the joiners drain, then stop the readers.
        loop {
            let mut caught_up = true;
            for (p, (h, _)) in joiners.iter().enumerate() {
                caught_up &=
                    h.stats().await?.input_next >= topics.events.high_watermark(p as u32)?;
            }
            if caught_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut lat = Vec::new();
        for r in readers {
            lat.extend(r.join().map_err(|_| anyhow::anyhow!("reader panicked"))??);
        }
        for (h, j) in joiners {
            h.stop(j).await;
        }
        anyhow::Ok(lat)
    })?;
    let mut lat = latencies;
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * q).round() as usize]
        }
    };
    let report = JoinBenchReport {
        impressions: t.impressions,
        events,
        clicks: t.clicks,
        partitions: args.partitions,
        snapshot_fields: args.fields,
        mean_event_bytes: bytes as f64 / events as f64,
        fsync: format!("{:?}", log_cfg.fsync),
        impressions_per_sec: t.impressions as f64 / elapsed,
        events_per_sec: events as f64 / elapsed,
        samples,
        baseline_log_events_per_sec: baseline,
        ratio_to_log: events as f64 / elapsed / baseline,
        latency_rate: args.latency_rate,
        latency_positives: lat.len() as u64,
        latency_p50_ms: pct(0.5),
        latency_p99_ms: pct(0.99),
        latency_max_ms: lat.last().copied().unwrap_or(f64::NAN),
    };
    super::print_report(&report, args.json)
}
