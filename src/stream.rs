//! The stream commands: `freshet simulate` (a live application into the event log),
//! `freshet ingest` (JSON events into the event log) and `freshet join` (the SampleJoiners).
//!
//! All three use the embedded log under `<data_dir>/log`, topics `events`, `samples` and
//! `dead-letters`, with the `[log]` settings.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use freshet_actors::event::{EVENTS_TOPIC, INGEST_REJECTS_TOPIC};
use freshet_actors::intake::{admit, Intake};
use freshet_actors::joiner::{JoinArgs, JoinerHandle, JoinerStats};
use freshet_actors::metrics::auc;
use freshet_actors::simulate::{SimConfig, SimRecord, Simulator};
use freshet_actors::stream::{open_topic, partition_of, StreamLog};
use serde::Serialize;

use freshet_actors::topics::{open_topics, topic_context};

use crate::settings::Settings;

/// Set by Ctrl-C: long-running commands finish their current batch and stop cleanly.
fn interrupted() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted; finishing the current batch");
                f.store(true, Ordering::SeqCst);
            }
        });
    });
    flag
}

/// Appends records grouped by partition, in batches.
struct Batcher<'a> {
    log: &'a dyn StreamLog,
    pending: Vec<Vec<Vec<u8>>>,
    queued: usize,
    appended: u64,
}

impl<'a> Batcher<'a> {
    fn new(log: &'a dyn StreamLog) -> Self {
        Self {
            log,
            pending: vec![Vec::new(); log.partitions() as usize],
            queued: 0,
            appended: 0,
        }
    }

    fn push(&mut self, key: &str, payload: Vec<u8>) {
        self.push_to(partition_of(key, self.log.partitions()), payload);
    }

    fn push_to(&mut self, partition: u32, payload: Vec<u8>) {
        self.pending[partition as usize].push(payload);
        self.queued += 1;
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        for (p, recs) in self.pending.iter_mut().enumerate() {
            if recs.is_empty() {
                continue;
            }
            let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
            self.log
                .append(p as u32, &refs)
                .with_context(|| format!("appending to {} partition {p}", self.log.topic()))?;
            self.appended += recs.len() as u64;
            recs.clear();
        }
        self.queued = 0;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// freshet simulate

#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// Stop after this many impressions (default: run until Ctrl-C; required with --fast).
    #[arg(long)]
    impressions: Option<u64>,
    /// Impressions per second of event time, and of wall time unless --fast.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// As fast as possible: event time still advances at --rate, but nothing waits for it.
    #[arg(long)]
    fast: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seeds the hidden model; keep it to continue one world.
    #[arg(long, default_value_t = 1)]
    world_seed: u64,
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    #[arg(long, default_value_t = 200_000)]
    items: u64,
    #[arg(long, default_value_t = 4)]
    items_per_request: u32,
    #[arg(long, default_value_t = 5000.0)]
    click_delay_median_ms: f64,
    #[arg(long, default_value_t = 1.0)]
    click_delay_sigma: f64,
    #[arg(long, default_value_t = 3600.0)]
    new_items_per_hour: f64,
    /// Quarter turns of the hidden per-id effects per hour of event time.
    #[arg(long, default_value_t = 0.25)]
    drift_per_hour: f64,
    #[arg(long, default_value_t = 0.01)]
    duplicate_rate: f64,
    #[arg(long, default_value_t = 0.02)]
    out_of_order_rate: f64,
    #[arg(long, default_value_t = 0.001)]
    malformed_rate: f64,
    /// Where the hidden click probabilities go, one TSV line per impression: request id, item,
    /// event time, probability, clicked (default: <data_dir>/truth-<seed>.tsv).
    #[arg(long, value_name = "FILE")]
    truth: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct SimulateReport {
    #[serde(flatten)]
    stats: freshet_actors::simulate::SimStats,
    ctr: f64,
    oracle_auc: Option<f64>,
    records_appended: u64,
    elapsed_s: f64,
    records_per_sec: f64,
    event_time_start_ms: i64,
    event_time_end_ms: i64,
    truth: PathBuf,
}

pub(crate) fn simulate(args: SimulateArgs, settings: &Settings) -> anyhow::Result<()> {
    if args.fast && args.impressions.is_none() {
        anyhow::bail!("--fast needs --impressions: event time is laid out so the run ends now");
    }
    let now = freshet_actors::stream::now_ms();
    // A fast run ends at the present, so no event is from the future and the joiner's
    // watermark moves as it would have live.
    let start_ms = match (args.fast, args.impressions) {
        (true, Some(n)) => now - (n as f64 / args.rate * 1000.0) as i64,
        _ => now,
    };
    let cfg = SimConfig {
        seed: args.seed,
        world_seed: args.world_seed,
        users: args.users,
        items: args.items,
        items_per_request: args.items_per_request,
        rate: args.rate,
        start_ms,
        click_delay_median_ms: args.click_delay_median_ms,
        click_delay_sigma: args.click_delay_sigma,
        new_items_per_hour: args.new_items_per_hour,
        drift_per_hour: args.drift_per_hour,
        duplicate_rate: args.duplicate_rate,
        out_of_order_rate: args.out_of_order_rate,
        malformed_rate: args.malformed_rate,
        ..SimConfig::default()
    };
    let mut sim = Simulator::new(cfg)?;
    let _lock = crate::lock::DataDirLock::for_embedded_log(settings, "running freshet simulate")?;
    let root = settings.log_dir();
    let events = open_topic(&root, EVENTS_TOPIC, &settings.log)
        .with_context(|| topic_context(EVENTS_TOPIC, &root, &settings.log))?;
    let truth_path = args.truth.clone().unwrap_or_else(|| {
        settings
            .node
            .data_dir
            .join(format!("truth-{}.tsv", args.seed))
    });
    if let Some(d) = truth_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut truth_out = std::io::BufWriter::new(
        std::fs::File::create(&truth_path)
            .with_context(|| format!("creating {}", truth_path.display()))?,
    );
    let stop = interrupted();
    let mut batcher = Batcher::new(&*events);
    let (mut recs, mut truth) = (Vec::<SimRecord>::new(), Vec::new());
    let (mut probs, mut clicks) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let mut progress = crate::progress::Progress::new("impressions");
    let limit = args.impressions.unwrap_or(u64::MAX);
    while sim.stats().impressions < limit && !stop.load(Ordering::Relaxed) {
        sim.next_request(&mut recs, &mut truth);
        for r in recs.drain(..) {
            batcher.push(&r.key, r.payload);
        }
        for t in truth.drain(..) {
            writeln!(
                truth_out,
                "{}\t{}\t{}\t{:.6}\t{}",
                t.request_id,
                t.item,
                t.time_ms,
                t.probability,
                u8::from(t.clicked)
            )
            .with_context(|| format!("writing {}", truth_path.display()))?;
            if probs.len() < 20_000_000 {
                probs.push(t.probability as f32);
                clicks.push(f32::from(u8::from(t.clicked)));
            }
        }
        if !args.fast {
            // Pace: emit what is due by the simulated clock, then wait for the wall clock.
            let due = Duration::from_millis((sim.clock_ms() - start_ms).max(0) as u64);
            let elapsed = started.elapsed();
            if due > elapsed {
                batcher.flush()?;
                std::thread::sleep((due - elapsed).min(Duration::from_millis(100)));
            }
        } else if batcher.queued >= 4096 {
            batcher.flush()?;
        }
        let s = sim.stats();
        progress.update(s.impressions, args.impressions, &|| {
            format!(
                "simulate: {} records, {} clicks",
                batcher.appended, s.clicks
            )
        });
    }
    // The clicks of the last requests are still scheduled; they belong to this run.
    sim.finish(&mut recs);
    for r in recs.drain(..) {
        batcher.push(&r.key, r.payload);
    }
    batcher.flush()?;
    truth_out
        .flush()
        .with_context(|| format!("writing {}", truth_path.display()))?;
    events.flush().context("syncing the event log")?;
    let s = sim.stats().clone();
    progress.done(&format!(
        "simulate: {} impressions, {} clicks, {} records appended",
        s.impressions, s.clicks, batcher.appended
    ));
    let elapsed = started.elapsed().as_secs_f64();
    let report = SimulateReport {
        ctr: s.clicks as f64 / s.impressions.max(1) as f64,
        oracle_auc: auc(&probs, &clicks),
        records_appended: batcher.appended,
        elapsed_s: elapsed,
        records_per_sec: batcher.appended as f64 / elapsed.max(1e-9),
        event_time_start_ms: start_ms,
        event_time_end_ms: sim.clock_ms(),
        truth: truth_path,
        stats: s,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// freshet ingest

#[derive(Debug, Args)]
pub(crate) struct IngestArgs {
    /// JSON lines of events; `-` (the default) reads standard input.
    #[arg(default_value = "-")]
    input: String,
    /// Events per append.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Append a partial batch once its first event has waited this long (checked as lines
    /// arrive).
    #[arg(long, default_value_t = 200)]
    linger_ms: u64,
    /// After each append, print {"acked": LINES, "appended": EVENTS, "dead_lettered": N} on
    /// stdout: every line read so far is in the logs, and the counts are exact.
    #[arg(long)]
    ack: bool,
    /// Ingest the file from its first line even if an earlier run ingested part of it. By
    /// default a rerun of the same file continues after the last line an earlier run appended
    /// (the mark lives in `<data_dir>/ingest/`); standard input always starts afresh.
    #[arg(long)]
    from_start: bool,
}

#[derive(Debug, Default, Serialize)]
struct IngestReport {
    /// Lines read, counting those an earlier run of the same file read.
    lines: u64,
    /// Lines an earlier run had ingested, skipped.
    skipped_lines: u64,
    events: u64,
    rejected: u64,
    rejected_by_reason: std::collections::BTreeMap<String, u64>,
}

pub(crate) fn ingest(args: IngestArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let _lock = crate::lock::DataDirLock::for_embedded_log(settings, "running freshet ingest")?;
    let root = settings.log_dir();
    let events_log = open_topic(&root, EVENTS_TOPIC, &settings.log)
        .with_context(|| topic_context(EVENTS_TOPIC, &root, &settings.log))?;
    let rejects_log = open_topic(&root, INGEST_REJECTS_TOPIC, &settings.log)
        .with_context(|| topic_context(INGEST_REJECTS_TOPIC, &root, &settings.log))?;
    let mut report = IngestReport::default();
    // Bytes of the input before the next line to read.
    let mut offset = 0u64;
    let (mut input, resume): (Box<dyn BufRead>, Option<crate::resume::Resume>) =
        if args.input == "-" {
            (Box::new(std::io::stdin().lock()), None)
        } else {
            let (resume, start) = crate::resume::Resume::open(
                &settings.node.data_dir,
                std::path::Path::new(&args.input),
                args.from_start,
            )?;
            let mut f = std::fs::File::open(&args.input)
                .with_context(|| format!("opening {}", args.input))?;
            match start {
                crate::resume::Start::Beginning => {}
                crate::resume::Start::Continue { offset: at, lines } => {
                    use std::io::Seek;
                    f.seek(std::io::SeekFrom::Start(at))
                        .with_context(|| format!("seeking {} to byte {at}", args.input))?;
                    eprintln!(
                        "continuing {} after line {lines} (byte {at}), where an earlier run \
                         stopped; --from-start ingests it all again",
                        args.input
                    );
                    report.lines = lines;
                    report.skipped_lines = lines;
                    offset = at;
                }
                crate::resume::Start::Changed { why } => {
                    tracing::warn!(file = %args.input, "{why}: ingesting it from its first line");
                }
            }
            (
                Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
                Some(resume),
            )
        };
    let source = format!("ingest:{}", args.input);
    let mut events = Batcher::new(&*events_log);
    let mut dead = Batcher::new(&*rejects_log);
    let mut oldest: Option<Instant> = None;
    let stdout = std::io::stdout();
    let flush = |events: &mut Batcher<'_>,
                 dead: &mut Batcher<'_>,
                 report: &IngestReport,
                 offset: u64|
     -> anyhow::Result<()> {
        let queued = events.queued + dead.queued;
        dead.flush()?;
        events.flush()?;
        if let Some(r) = &resume {
            if queued > 0 {
                // Durable before the mark says so, whatever the log's fsync policy.
                events_log
                    .flush()
                    .context("making the appended events durable")?;
                rejects_log
                    .flush()
                    .context("making the dead letters durable")?;
            }
            r.save(offset, report.lines)?;
        }
        if args.ack {
            let mut out = stdout.lock();
            writeln!(
                out,
                "{{\"acked\": {}, \"appended\": {}, \"dead_lettered\": {}}}",
                report.lines, events.appended, dead.appended
            )?;
            out.flush()?;
        }
        Ok(())
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", args.input))?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        report.lines += 1;
        match admit(&line, report.lines, &source, events_log.partitions()) {
            Intake::Blank => {}
            Intake::Event { partition, record } => {
                report.events += 1;
                events.push_to(partition, record);
            }
            Intake::Refused(r) => {
                report.rejected += 1;
                *report
                    .rejected_by_reason
                    .entry(r.reason.to_owned())
                    .or_default() += 1;
                dead.push(&source, r.dead_letter);
            }
        }
        let started = *oldest.get_or_insert_with(Instant::now);
        if events.queued + dead.queued >= args.batch
            || started.elapsed() >= Duration::from_millis(args.linger_ms)
        {
            flush(&mut events, &mut dead, &report, offset)?;
            oldest = None;
        }
    }
    flush(&mut events, &mut dead, &report, offset)?;
    if report.rejected > 0 {
        tracing::warn!(
            rejected = report.rejected,
            topic = INGEST_REJECTS_TOPIC,
            "refused events were written aside with their line numbers"
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// freshet join

#[derive(Debug, Args)]
pub(crate) struct JoinArgsCli {
    /// Stop (with a checkpoint) once every partition has joined everything in the event log.
    #[arg(long)]
    until_caught_up: bool,
}

#[derive(Debug, Serialize)]
struct JoinReport {
    partitions: Vec<JoinerStats>,
    elapsed_s: f64,
}

pub(crate) fn join(args: JoinArgsCli, settings: &Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(join_async(args, settings))
}

async fn join_async(args: JoinArgsCli, settings: &Settings) -> anyhow::Result<()> {
    let _lock = crate::lock::DataDirLock::acquire(&settings.node.data_dir, "running freshet join")?;
    let topics = open_topics(&settings.log_dir(), &settings.log)?;
    let started = Instant::now();
    let mut joiners = Vec::new();
    for p in 0..topics.events.partitions() {
        let a = JoinArgs {
            partition: p,
            events: topics.events.clone(),
            samples: topics.samples.clone(),
            dead_letters: topics.dead_letters.clone(),
            checkpoint_dir: settings.node.data_dir.join("joiner"),
            config: settings.joiner.window.clone(),
            checkpoint_every: settings.joiner.checkpoint,
            group: "joiner".into(),
            batch: settings.joiner_batch(),
            faults: Default::default(),
        };
        let (h, j) = JoinerHandle::spawn(a)
            .await
            .with_context(|| format!("starting the joiner of partition {p}"))?;
        joiners.push((h, j));
    }
    let stop = interrupted();
    let mut progress = crate::progress::Progress::new("events");
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut caught_up = true;
        let mut behind = 0u64;
        let mut stats = Vec::new();
        for (p, (h, _)) in joiners.iter().enumerate() {
            let s = h.stats().await?;
            let high = topics.events.high_watermark(p as u32)?;
            caught_up &= s.input_next >= high;
            behind += high.saturating_sub(s.input_next);
            stats.push(s);
        }
        // Events read of those the log holds now (a total that grows while events arrive).
        let read: u64 = stats.iter().map(|s| s.task.records_read).sum();
        let samples: u64 = stats.iter().map(|s| s.task.samples_written).sum();
        progress.update(read, args.until_caught_up.then_some(read + behind), &|| {
            format!("join: {samples} samples written")
        });
        if (args.until_caught_up && caught_up) || stop.load(Ordering::Relaxed) {
            progress.done(&format!(
                "join: {read} events read, {samples} samples written"
            ));
            break;
        }
    }
    let mut partitions = Vec::new();
    for (h, j) in joiners {
        partitions.push(h.stats().await?);
        h.stop(j).await;
    }
    let report = JoinReport {
        partitions,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
