//! `freshet train`: offline (T+1) training on files, through the same trainer and ShardOwner
//! actors the online pipeline uses.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use freshet_actors::ckpt::writer::{CheckpointHandle, StepBoundary, WriterArgs};
use freshet_actors::ckpt::{ModelStore, VersionMeta};
use freshet_actors::dense::{DenseNet, ModelKind, Threads};
use freshet_actors::embedding::TableConfig;
use freshet_actors::metrics::{auc, evaluate, Evaluation};
use freshet_actors::online::feed;
use freshet_actors::sample::criteo::{self, CriteoParser};
use freshet_actors::sample::json::{read_jsonl, read_msgpack, SampleDecoder};
use freshet_actors::sample::RejectReason;
use freshet_actors::sample::{Format, RejectSink, RejectStats, SampleBlock, Schema};
use freshet_actors::shard::ShardRouter;
use freshet_actors::stream::{LogBackend, StreamLog};
use freshet_actors::trainer::Trainer;
use freshet_actors::TableName;
use serde::Serialize;

use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// Training data, one or more files (comma-separated), read in the given order.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "from_log",
        value_name = "FILE"
    )]
    data: Vec<PathBuf>,
    /// Train on the node's sample log (the joined samples `freshet dev` writes) instead of
    /// files: from the start of the log (with --init, from the offsets the --init version
    /// records) to its end. The version written records where in the log it ends, so
    /// `freshet ctl calibrate --base STORE` can install it and resume online training there.
    /// Without --test, the last 10% of each partition is held out for the test metrics (and
    /// left to online training). With the embedded log, the node must be stopped.
    #[arg(long, conflicts_with = "data")]
    from_log: bool,
    /// criteo, jsonl or msgpack.
    #[arg(long, default_value = "criteo")]
    format: Format,
    /// lr, wdl, deepfm, dcn or dlrm (default: model.kind from the config; with --init, the
    /// saved model's).
    #[arg(long)]
    model: Option<ModelKind>,
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    /// Samples per step (default: train.batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Test data. Without it the last 10% of --data rows are held out.
    #[arg(long, value_delimiter = ',', value_name = "FILE")]
    test: Vec<PathBuf>,
    /// The model store to write versions to (docs/model-store.md): the final model, and
    /// versions during training per `checkpoint.*` or --ckpt-every-steps.
    #[arg(long, value_name = "STORE")]
    out: Option<PathBuf>,
    /// Start from the newest version in the model store STORE instead of a fresh model.
    #[arg(long, value_name = "STORE")]
    init: Option<PathBuf>,
    /// With --init: start from this version instead of the newest.
    #[arg(long, value_name = "V", requires = "init")]
    init_version: Option<u64>,
    /// Write a version every N steps during training (default: checkpoint.every_steps).
    #[arg(long, value_name = "N", requires = "out")]
    ckpt_every_steps: Option<u64>,
    /// Threads for the dense math (default: train.threads).
    #[arg(long)]
    threads: Option<usize>,
    /// Read at most this many rows of --data.
    #[arg(long)]
    max_rows: Option<usize>,
    /// Where refused rows go (default: <data_dir>/rejects.tsv).
    #[arg(long, value_name = "FILE")]
    rejects: Option<PathBuf>,
    /// Seed of the dense initialisation (default: model.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Make room for about N rows in each table the model reads, spread over the shards,
    /// before training starts: index, row metadata and rows are allocated and faulted in up
    /// front (see `embedding.tables.<t>.reserve_rows`, which this overrides), so the steps do
    /// not pay for fresh memory as the tables fill. Tables still grow past N.
    #[arg(long, value_name = "N")]
    reserve_rows: Option<u64>,
}

/// Rows one of `shards` shards reserves so that `total` keys, spread by the shard hash, fit
/// in every shard: the even share plus four standard deviations of a shard's binomial count.
fn reserve_per_shard(total: u64, shards: u32) -> u64 {
    let even = total.div_ceil(u64::from(shards.max(1)));
    even + (4.0 * (even as f64).sqrt()).ceil() as u64
}

#[derive(Debug, Serialize)]
struct TrainReport {
    model: &'static str,
    rows: u64,
    rejected_rows: u64,
    rejects: RejectStats,
    reject_file: PathBuf,
    train_rows: u64,
    test_rows: u64,
    epochs: u32,
    batch: usize,
    threads: usize,
    shards: u32,
    steps: u64,
    /// Training only: parsing and evaluation are excluded.
    samples_per_sec: f64,
    train_seconds: f64,
    parse_seconds: f64,
    train_logloss: f64,
    test_auc: Option<f64>,
    test_logloss: f64,
    test_calibration: Option<f64>,
    /// The AUC of the generator's true probabilities on the test rows, when a `<test>.prob`
    /// file lies beside the test data.
    oracle_auc: Option<f64>,
    per_epoch: Vec<EpochReport>,
    out: Option<PathBuf>,
    /// The store version holding the final model (with --out).
    version: Option<u64>,
}

#[derive(Debug, Serialize)]
struct EpochReport {
    epoch: u32,
    train_logloss: f64,
    samples_per_sec: f64,
    test: Evaluation,
}

/// Rows of several files, with what each file contributed.
struct Loaded {
    block: SampleBlock,
    /// Per file: (path, lines read, rows accepted).
    files: Vec<(PathBuf, u64, usize)>,
}

fn read_files(
    paths: &[PathBuf],
    format: Format,
    schema: &Schema,
    rejects: &mut RejectSink,
    max_rows: Option<usize>,
) -> anyhow::Result<Loaded> {
    let mut block = SampleBlock::for_schema(schema);
    let mut files = Vec::new();
    let criteo = match format {
        Format::Criteo => Some(CriteoParser::new(schema)?),
        _ => None,
    };
    let decoder = SampleDecoder::new(schema);
    for p in paths {
        if max_rows.is_some_and(|m| block.len() >= m) {
            break;
        }
        rejects.set_source(p.display().to_string());
        let before = block.len();
        let open = || -> anyhow::Result<_> {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            Ok(std::io::BufReader::with_capacity(1 << 20, f))
        };
        let lines = match format {
            Format::Criteo => {
                let parser = criteo.as_ref().context("criteo parser")?;
                criteo::read_into(parser, open()?, &mut block, rejects, max_rows)
            }
            Format::Jsonl => read_jsonl(&decoder, open()?, &mut block, rejects, max_rows),
            Format::Msgpack => {
                let data = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                read_msgpack(&decoder, &data, &mut block, rejects, max_rows)
            }
        }
        .with_context(|| format!("reading {}", p.display()))?;
        files.push((p.clone(), lines, block.len() - before));
    }
    rejects.flush()?;
    Ok(Loaded { block, files })
}

/// Where each training row read from the sample log came from, so that a version captured
/// after any number of rows records exactly the offsets those rows (and the refusals among
/// them) consumed: the same accounting as the online trainer's versions.
#[derive(Debug, Default)]
struct LogPositions {
    parts: BTreeMap<u32, PartPositions>,
}

#[derive(Debug, Default)]
struct PartPositions {
    /// Every record read below the cut, in offset order.
    offsets: Vec<u64>,
    /// Rows trained before the record counts as consumed: its row's index + 1, or for a
    /// refusal, its predecessor's (it is consumed with the row before it).
    needs: Vec<usize>,
    /// `refused_before[i]`: refusals among the first `i` records.
    refused_before: Vec<u64>,
    /// The offset after everything read below the cut.
    end: u64,
}

impl PartPositions {
    fn push(&mut self, offset: u64, row: Option<usize>) {
        let needs = match row {
            Some(i) => i + 1,
            None => self.needs.last().copied().unwrap_or(0),
        };
        if self.refused_before.is_empty() {
            self.refused_before.push(0);
        }
        let refused = self.refused_before.last().copied().unwrap_or(0) + u64::from(row.is_none());
        self.offsets.push(offset);
        self.needs.push(needs);
        self.refused_before.push(refused);
    }
}

impl LogPositions {
    /// Per partition the next offset to consume, and the refusals consumed, once the first
    /// `rows` training rows are trained.
    fn at(&self, rows: usize) -> (BTreeMap<u32, u64>, u64) {
        let mut offsets = BTreeMap::new();
        let mut refused = 0;
        for (&p, pp) in &self.parts {
            let k = pp.needs.partition_point(|&n| n <= rows);
            offsets.insert(p, pp.offsets.get(k).copied().unwrap_or(pp.end));
            refused += pp.refused_before.get(k).copied().unwrap_or(0);
        }
        (offsets, refused)
    }
}

/// Samples read from the sample log.
struct LogRead {
    train: SampleBlock,
    test: SampleBlock,
    positions: LogPositions,
}

/// Reads every partition of the sample log from `start` (or its low watermark) to its high
/// watermark now, round-robin in chunks so that training sees the partitions interleaved as
/// the online trainer does. With `hold_out`, the last 10% of each partition's range is the
/// test set and is not recorded as consumed. `max_rows` caps the records read, split evenly
/// over the partitions. Refused records go to `rejects`, as they would go to the online
/// trainer's dead-letter topic.
fn read_log(
    log: &dyn StreamLog,
    schema: &Schema,
    start: &BTreeMap<u32, u64>,
    max_rows: Option<usize>,
    hold_out: bool,
    rejects: &mut RejectSink,
) -> anyhow::Result<LogRead> {
    let decoder = SampleDecoder::new(schema);
    let parts = log.partitions();
    let quota = max_rows.map(|m| m.div_ceil(parts.max(1) as usize) as u64);
    // (partition, next offset to read, cut, end)
    let mut plan = Vec::new();
    for p in 0..parts {
        let low = log.low_watermark(p)?;
        let high = log.high_watermark(p)?;
        let want = start.get(&p).copied().unwrap_or(0);
        if want > high {
            bail!(
                "--init records offset {want} for sample partition {p}, beyond the end of this \
                 node's sample log ({high}): it was trained on another log"
            );
        }
        if want < low {
            eprintln!(
                "sample partition {p}: offsets {want}..{low} were deleted by retention before \
                 this run; reading from {low}"
            );
        }
        let from = want.max(low);
        let end = quota.map_or(high, |q| high.min(from + q));
        let cut = if hold_out {
            end - (end - from) / 10
        } else {
            end
        };
        plan.push((p, from, cut, end));
    }
    let total: u64 = plan.iter().map(|&(_, from, _, end)| end - from).sum();
    if total == 0 {
        bail!(
            "the sample log holds no samples to train on{} (run `freshet dev` to collect some)",
            if start.is_empty() {
                String::new()
            } else {
                " after the --init version's offsets".to_string()
            }
        );
    }
    let mut train = SampleBlock::for_schema(schema);
    let mut test = SampleBlock::for_schema(schema);
    let mut positions = LogPositions::default();
    let mut progress = Progress::new();
    let mut read = 0u64;
    loop {
        let mut any = false;
        for (p, at, cut, end) in plan.iter_mut() {
            let (p, cut, end) = (*p, *cut, *end);
            let pp = positions.parts.entry(p).or_default();
            pp.end = cut;
            if *at >= end {
                continue;
            }
            let recs = log.read(p, *at, ((end - *at) as usize).min(4096))?;
            let Some(last) = recs.last() else {
                bail!("sample partition {p}: nothing readable at offset {at} below its end {end}");
            };
            *at = last.offset + 1;
            any = true;
            for rec in recs.iter().take_while(|r| r.offset < end) {
                let held_out = rec.offset >= cut;
                let block = if held_out { &mut test } else { &mut train };
                match feed::decode(&decoder, rec, p, block) {
                    Ok(()) if held_out => {}
                    Ok(()) => pp.push(rec.offset, Some(train.len() - 1)),
                    Err(dl) => {
                        rejects.set_source(format!("sample log partition {p}"));
                        let why = RejectReason::Malformed(format!("{}: {}", dl.reason, dl.detail));
                        rejects.reject(rec.offset, &why, &rec.payload)?;
                        if !held_out {
                            pp.push(rec.offset, None);
                        }
                    }
                }
                read += 1;
            }
            progress.tick(|| format!("reading the sample log: {read} of {total} records"));
        }
        if !any {
            break;
        }
    }
    progress.done(&format!(
        "read {read} records of the sample log: {} to train, {} to test, {} refused",
        train.len(),
        test.len(),
        rejects.stats().total
    ));
    Ok(LogRead {
        train,
        test,
        positions,
    })
}

/// The generator's true probabilities for the rows of `loaded`, when every file has a
/// `<file>.prob` beside it and no row was refused (otherwise rows and probabilities would not
/// line up).
fn oracle_probabilities(loaded: &Loaded) -> Option<Vec<f32>> {
    let mut out = Vec::new();
    for (path, lines, accepted) in &loaded.files {
        if *lines != *accepted as u64 {
            return None;
        }
        let mut prob = path.clone().into_os_string();
        prob.push(".prob");
        let text = std::fs::read_to_string(PathBuf::from(prob)).ok()?;
        let before = out.len();
        for l in text.lines().take(*accepted) {
            out.push(l.trim().parse::<f32>().ok()?);
        }
        if out.len() - before != *accepted {
            return None;
        }
    }
    Some(out)
}

/// Progress on stderr: a line rewritten in place on a terminal, a line every 10 s otherwise.
struct Progress {
    tty: bool,
    last: Instant,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    fn tick(&mut self, msg: impl FnOnce() -> String) {
        let every = if self.tty { 0.25 } else { 10.0 };
        if self.last.elapsed().as_secs_f64() >= every {
            self.last = Instant::now();
            if self.tty {
                eprint!("\r\x1b[2K{}", msg());
            } else {
                eprintln!("{}", msg());
            }
        }
    }

    fn done(&mut self, msg: &str) {
        if self.tty {
            eprintln!("\r\x1b[2K{msg}");
        } else {
            eprintln!("{msg}");
        }
    }
}

pub(crate) fn run(args: TrainArgs, settings: &Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(train(args, settings))
}

async fn train(args: TrainArgs, settings: &Settings) -> anyhow::Result<()> {
    let threads = Threads::new(args.threads.unwrap_or(settings.train.threads))?;
    let batch = args.batch.unwrap_or(settings.train.batch);
    if batch == 0 {
        bail!("invalid value 0 for `--batch`: expected a positive batch size");
    }
    // The model: fresh from config and flags, or restored from --init, re-routed into
    // embedding.shards shards whatever count it was written with.
    let saved = match &args.init {
        Some(dir) => {
            let store = ModelStore::open_existing(dir)
                .with_context(|| format!("opening --init {}", dir.display()))?;
            let v = match args.init_version {
                Some(v) => v,
                None => store
                    .latest()?
                    .with_context(|| format!("--init {} holds no model version", dir.display()))?,
            };
            let r = store
                .restore(v, Some(settings.embedding.shards))
                .with_context(|| {
                    format!(
                        "restoring version {v} of --init {} (`freshet ckpt verify --store {}` \
                         shows which versions are good; --init-version picks one)",
                        dir.display(),
                        dir.display()
                    )
                })?;
            eprintln!(
                "restored version {v} of {} (step {})",
                dir.display(),
                r.manifest.step
            );
            Some(r)
        }
        None => None,
    };
    let mut rows_before = 0u64;
    let mut rejected_before = 0u64;
    let mut log_start = BTreeMap::new();
    let (schema, mut trainer, tables, restore) = match saved {
        Some(s) => {
            if let Some(k) = args.model {
                if k != s.manifest.model.kind {
                    bail!(
                        "--model {} but the model in --init is {}",
                        k.name(),
                        s.manifest.model.kind.name()
                    );
                }
            }
            rows_before = s.manifest.rows_trained;
            rejected_before = s.manifest.samples_rejected;
            log_start = s.manifest.sample_offsets.clone();
            let net = DenseNet::from_state(s.dense)?;
            let mut t = Trainer::with_net(s.manifest.schema.clone(), net)?;
            // manifest.json carries no checksum of its own: check that its tables give the rows
            // the model reads before any lookup slices them.
            Trainer::check_tables(&s.manifest.schema, &s.manifest.model, &s.manifest.tables)
                .context("the model in --init does not fit its own tables")?;
            t.set_step(s.manifest.step);
            let tables: Vec<(String, TableConfig)> =
                s.manifest.tables.clone().into_iter().collect();
            (
                s.manifest.schema,
                t,
                tables,
                s.shards.into_iter().map(Some).collect(),
            )
        }
        None => {
            let mut model = settings.model.clone();
            if let Some(k) = args.model {
                model.kind = k;
            }
            if let Some(seed) = args.seed {
                model.seed = seed;
            }
            let schema = settings.schema.clone();
            let tables = settings
                .model_tables(&schema, &model)?
                .into_iter()
                .collect();
            let t = Trainer::new(schema.clone(), model)?;
            (schema, t, tables, Vec::new())
        }
    };

    // Checked before the data is read, so a bad value fails at once.
    let mut tables = tables;
    if let Some(n) = args.reserve_rows {
        let per_shard = reserve_per_shard(n, settings.embedding.shards);
        for (name, c) in &mut tables {
            c.reserve_rows = per_shard;
            c.validate(&format!("embedding.tables.{name}"))
                .map_err(|e| anyhow::anyhow!("--reserve-rows {n}: {e}"))?;
        }
    }

    // Data.
    let reject_path = args
        .rejects
        .clone()
        .unwrap_or_else(|| settings.node.data_dir.join("rejects.tsv"));
    if let Some(p) = reject_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let mut rejects = RejectSink::to_file(&reject_path)?;
    let t0 = Instant::now();
    let mut log_positions = None;
    let (train_block, test_block, oracle) = if args.from_log {
        if args.epochs != 1 {
            bail!(
                "--from-log trains each sample of the log once (the version records which \
                 samples it holds, and online training resumes after them): use --epochs 1"
            );
        }
        // Opening the embedded log recovers it: never while a node appends to it.
        let _lock = match settings.log.backend {
            LogBackend::Embedded => Some(crate::lock::DataDirLock::acquire(
                &settings.node.data_dir,
                "training from its sample log",
            )?),
            LogBackend::Kafka => None,
        };
        let topics = crate::stream::open_topics(&settings.log_dir(), &settings.log)?;
        let read = read_log(
            topics.samples.as_ref(),
            &schema,
            &log_start,
            args.max_rows,
            args.test.is_empty(),
            &mut rejects,
        )?;
        log_positions = Some(read.positions);
        if args.test.is_empty() {
            (read.train, read.test, None)
        } else {
            let test = read_files(&args.test, args.format, &schema, &mut rejects, None)?;
            let oracle = oracle_probabilities(&test);
            (read.train, test.block, oracle)
        }
    } else {
        let data = read_files(
            &args.data,
            args.format,
            &schema,
            &mut rejects,
            args.max_rows,
        )?;
        if args.test.is_empty() {
            let n = data.block.len();
            let split = n - n / 10;
            let mut tr = SampleBlock::for_schema(&schema);
            let mut te = SampleBlock::for_schema(&schema);
            for (i, r) in data.block.rows().enumerate() {
                if i < split {
                    tr.push_row(r)
                } else {
                    te.push_row(r)
                }
            }
            let oracle = oracle_probabilities(&data).map(|p| p[split..].to_vec());
            (tr, te, oracle)
        } else {
            let test = read_files(&args.test, args.format, &schema, &mut rejects, None)?;
            let oracle = oracle_probabilities(&test);
            (data.block, test.block, oracle)
        }
    };
    let parse_seconds = t0.elapsed().as_secs_f64();
    let stats = rejects.stats().clone();
    if stats.total > 0 {
        tracing::warn!(rejected = stats.total, file = %reject_path.display(), "refused malformed rows");
    }
    if train_block.is_empty() {
        bail!(
            "no training rows: every row of --data was refused (see {})",
            reject_path.display()
        );
    }
    let test_labels: Vec<f32> = test_block.ctr_labels().collect();
    let oracle_auc = oracle.and_then(|p| auc(&p, &test_labels));

    // Shards.
    let table_list: Vec<(TableName, TableConfig)> = tables
        .iter()
        .map(|(n, c)| (TableName::new(n), c.clone()))
        .collect();
    let reserving = table_list.iter().any(|(_, c)| c.reserve_rows > 0);
    let shards_start = Instant::now();
    let spill = table_list
        .iter()
        .any(|(_, c)| c.dram_budget_bytes.is_some())
        .then(|| settings.spill_dir());
    let router = ShardRouter::spawn_local(
        settings.embedding.shards,
        table_list,
        spill.as_deref(),
        restore,
    )
    .await
    .context("starting the shard owners")?;
    if reserving {
        eprintln!(
            "shards reserved their rows in {:.1}s",
            shards_start.elapsed().as_secs_f64()
        );
    }
    let ckpt = match &args.out {
        Some(out) => {
            let mut schedule = settings.checkpoint.schedule();
            if let Some(n) = args.ckpt_every_steps {
                schedule.every_steps = (n > 0).then_some(n);
            }
            let store = ModelStore::open(out)
                .with_context(|| format!("opening --out {}", out.display()))?;
            let (h, _join) = CheckpointHandle::spawn(WriterArgs {
                store,
                shards: router.clone(),
                schedule,
                faults: Default::default(),
            })
            .await
            .context("starting the checkpoint writer")?;
            Some(h)
        }
        None => None,
    };
    let table_map: BTreeMap<String, TableConfig> = tables.iter().cloned().collect();
    // With --from-log, a version records the log offsets of exactly the rows trained so far
    // and the refusals among them, as the online trainer's versions do.
    let at_rows = |rows: u64| match &log_positions {
        Some(p) => p.at(rows as usize),
        None => (BTreeMap::new(), 0),
    };
    let boundary = |trainer: &Trainer, rows: u64| StepBoundary {
        meta: VersionMeta {
            step: trainer.step(),
            rows_trained: rows_before + rows,
            samples_rejected: rejected_before + at_rows(rows).1,
            replays: Vec::new(),
            calibrated_from: None,
            sample_offsets: at_rows(rows).0,
            joiner_offsets: BTreeMap::new(),
            model: trainer.net().config().clone(),
            schema: schema.clone(),
            tables: table_map.clone(),
        },
        dense: trainer.net().state(),
        full: false,
    };

    let n = train_block.len();
    eprintln!(
        "training {} on {n} rows ({} refused), {} test rows, batch {batch}, {} threads, {} shards",
        trainer.net().config().kind.name(),
        stats.total,
        test_block.len(),
        threads.count(),
        settings.embedding.shards
    );
    let mut progress = Progress::new();
    let mut per_epoch = Vec::new();
    let mut train_secs = 0.0;
    let mut last_loss = 0.0;
    let mut steps = 0u64;
    let mut rows_done = 0u64;
    for epoch in 1..=args.epochs {
        let start = Instant::now();
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for s in (0..n).step_by(batch) {
            // The next step's keys are deduplicated while this one waits for its rows.
            let next = (s + batch < n).then(|| s + batch..(s + 2 * batch).min(n));
            let rep = trainer
                .train_batch_ahead(&train_block, s..(s + batch).min(n), next, &router, &threads)
                .await?;
            steps += 1;
            loss_sum += rep.loss_sum;
            seen += rep.rows;
            rows_done += rep.rows as u64;
            if let Some(ck) = ckpt.as_ref().filter(|ck| ck.due(trainer.step())) {
                trainer.flush().await?;
                ck.capture(boundary(&trainer, rows_done))
                    .await
                    .context("taking a checkpoint")?;
            }
            progress.tick(|| {
                let el = start.elapsed().as_secs_f64();
                format!(
                    "epoch {epoch}/{}: {seen}/{n} rows, {:.0} rows/s, loss {:.4}",
                    args.epochs,
                    seen as f64 / el,
                    loss_sum / seen as f64
                )
            });
        }
        // The epoch ends when its last gradients are applied.
        trainer.flush().await?;
        let secs = start.elapsed().as_secs_f64();
        train_secs += secs;
        last_loss = loss_sum / seen.max(1) as f64;
        let test = evaluate_block(&mut trainer, &test_block, batch, &router, &threads).await?;
        progress.done(&format!(
            "epoch {epoch}/{}: {n} rows in {secs:.1}s ({:.0} rows/s), train loss {last_loss:.4}, \
             test auc {}, logloss {:.4}",
            args.epochs,
            n as f64 / secs,
            test.auc.map_or("-".into(), |a| format!("{a:.4}")),
            test.logloss
        ));
        per_epoch.push(EpochReport {
            epoch,
            train_logloss: last_loss,
            samples_per_sec: n as f64 / secs,
            test,
        });
    }
    let final_test = per_epoch
        .last()
        .map(|e| e.test.clone())
        .unwrap_or_else(|| evaluate(&[], &[]));

    let mut version = None;
    if let (Some(ck), Some(out)) = (&ckpt, &args.out) {
        // The final model is one more version, at the last step boundary.
        ck.capture(boundary(&trainer, rows_done))
            .await
            .context("capturing the final model")?;
        let st = ck.flush().await.context("writing the final model")?;
        ck.stop();
        if st.write_failures > 0 {
            bail!(
                "{} of {} versions could not be written to {}: {}",
                st.write_failures,
                st.captures,
                out.display(),
                st.last_error.unwrap_or_default()
            );
        }
        version = st.last_version;
        eprintln!(
            "model written to {} as version {} ({} full, {} delta versions this run)",
            out.display(),
            version.unwrap_or(0),
            st.full_written,
            st.deltas_written
        );
    }
    router.stop();

    let report = TrainReport {
        model: trainer.net().config().kind.name(),
        rows: (n + test_block.len()) as u64,
        rejected_rows: stats.total,
        rejects: stats,
        reject_file: reject_path,
        train_rows: n as u64,
        test_rows: test_block.len() as u64,
        epochs: args.epochs,
        batch,
        threads: threads.count(),
        shards: settings.embedding.shards,
        steps,
        samples_per_sec: (n as f64 * f64::from(args.epochs)) / train_secs.max(1e-9),
        train_seconds: train_secs,
        parse_seconds,
        train_logloss: last_loss,
        test_auc: final_test.auc,
        test_logloss: final_test.logloss,
        test_calibration: final_test.calibration,
        oracle_auc,
        per_epoch,
        out: args.out.clone(),
        version,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn evaluate_block(
    trainer: &mut Trainer,
    block: &SampleBlock,
    batch: usize,
    router: &ShardRouter,
    threads: &Threads,
) -> anyhow::Result<Evaluation> {
    let mut preds = Vec::with_capacity(block.len());
    for s in (0..block.len()).step_by(batch.max(1)) {
        let p = trainer
            .predict_batch(block, s..(s + batch).min(block.len()), router, threads)
            .await?;
        preds.extend(p);
    }
    let labels: Vec<f32> = block.ctr_labels().collect();
    Ok(evaluate(&preds, &labels))
}

/// `freshet gen`: Criteo-layout rows from a hidden model, with the true probabilities.
#[derive(Debug, Args)]
pub(crate) struct GenArgs {
    #[arg(long)]
    rows: u64,
    /// Seeds the rows; use another seed for a test file of the same world.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seeds the hidden model; keep it equal for a training file and its test file.
    #[arg(long, default_value_t = 1)]
    world_seed: u64,
    /// Output file; the true click probabilities go to `<out>.prob`, one per line.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Rotate the hidden per-id effects over the rows (0: none; 1: 90° by the last row).
    #[arg(long, default_value_t = 0.0)]
    drift: f64,
    /// Distinct values per categorical field.
    #[arg(long, default_value_t = 1_000_000)]
    vocab: u64,
    /// Zipf exponent of the id popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
}

pub(crate) fn gen(args: GenArgs) -> anyhow::Result<()> {
    use freshet_actors::gen::{GenConfig, Generator};
    use std::io::Write;
    let cfg = GenConfig {
        rows: args.rows,
        seed: args.seed,
        world_seed: args.world_seed,
        vocab: args.vocab,
        zipf: args.zipf,
        drift: args.drift,
        ..Default::default()
    };
    let mut g = Generator::new(cfg)?;
    let prob_path = {
        let mut p = args.out.clone().into_os_string();
        p.push(".prob");
        PathBuf::from(p)
    };
    let create = |p: &Path| -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        Ok(std::io::BufWriter::with_capacity(1 << 20, f))
    };
    let mut out = create(&args.out)?;
    let mut probs = create(&prob_path)?;
    let mut progress = Progress::new();
    let start = Instant::now();
    let (mut clicks, mut psum) = (0u64, 0f64);
    let mut all_p = Vec::with_capacity(args.rows.min(50_000_000) as usize);
    let mut all_y = Vec::with_capacity(all_p.capacity());
    for i in 0..args.rows {
        let r = g.next_row();
        g.write_row(&r, &mut out)
            .with_context(|| format!("writing {}", args.out.display()))?;
        writeln!(probs, "{:.6}", r.probability)
            .with_context(|| format!("writing {}", prob_path.display()))?;
        clicks += u64::from(r.label);
        psum += r.probability;
        all_p.push(r.probability as f32);
        all_y.push(f32::from(r.label));
        progress.tick(|| {
            format!(
                "{} of {} rows, {:.0} rows/s",
                i + 1,
                args.rows,
                (i + 1) as f64 / start.elapsed().as_secs_f64()
            )
        });
    }
    out.flush()?;
    probs.flush()?;
    progress.done(&format!(
        "{} rows written to {}",
        args.rows,
        args.out.display()
    ));
    let report = serde_json::json!({
        "rows": args.rows,
        "out": args.out,
        "probabilities": prob_path,
        "ctr": clicks as f64 / args.rows.max(1) as f64,
        "mean_probability": psum / args.rows.max(1) as f64,
        "oracle_auc": auc(&all_p, &all_y),
        "seconds": start.elapsed().as_secs_f64(),
    });
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use freshet_actors::event::SAMPLES_TOPIC;
    use freshet_actors::stream::{EmbeddedLog, LogConfig};
    use freshet_actors::testkit::fixtures::joined_sample;

    use super::*;

    /// Two partitions of 20 and 10 records; offsets 0 and 7 of partition 0 are garbage.
    fn log(dir: &Path) -> EmbeddedLog {
        let cfg = LogConfig {
            partitions: 2,
            ..LogConfig::default()
        };
        let log = EmbeddedLog::open(dir, SAMPLES_TOPIC, cfg).unwrap();
        for (p, n) in [(0u32, 20u64), (1, 10)] {
            let recs: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    if p == 0 && (i == 0 || i == 7) {
                        b"not a sample".to_vec()
                    } else {
                        joined_sample(i, i % 3 == 0)
                    }
                })
                .collect();
            let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
            log.append(p, &refs).unwrap();
        }
        log
    }

    #[test]
    fn a_log_read_accounts_every_offset_at_every_row_count() {
        let dir = tempfile::tempdir().unwrap();
        let log = log(dir.path());
        let schema = Schema::default();
        let mut rejects = RejectSink::counting();
        let r = read_log(&log, &schema, &BTreeMap::new(), None, true, &mut rejects).unwrap();
        // Cuts at 18 and 9: 16 + 9 rows to train, 2 + 1 held out; both refusals below the cut.
        assert_eq!((r.train.len(), r.test.len()), (25, 3));
        assert_eq!(rejects.stats().total, 2);
        // Nothing trained: only the refusal at offset 0 is consumed.
        assert_eq!(r.positions.at(0), (BTreeMap::from([(0, 1), (1, 0)]), 1));
        // Whatever the rows trained, offsets consumed = rows + refusals.
        for rows in 0..=r.train.len() {
            let (offsets, refused) = r.positions.at(rows);
            assert_eq!(
                offsets.values().sum::<u64>(),
                rows as u64 + refused,
                "at {rows} rows"
            );
        }
        assert_eq!(
            r.positions.at(r.train.len()),
            (BTreeMap::from([(0, 18), (1, 9)]), 2)
        );

        // From an --init version's offsets, with a row cap and no hold-out.
        let start = BTreeMap::from([(0, 10), (1, 4)]);
        let mut rejects = RejectSink::counting();
        let r = read_log(&log, &schema, &start, Some(6), false, &mut rejects).unwrap();
        assert_eq!((r.train.len(), r.test.len()), (6, 0));
        assert_eq!(r.positions.at(6), (BTreeMap::from([(0, 13), (1, 7)]), 0));
        assert_eq!(r.positions.at(0).0, start);

        // Offsets beyond the log, and nothing left to read, are refused.
        let e = read_log(
            &log,
            &schema,
            &BTreeMap::from([(1, 11)]),
            None,
            true,
            &mut rejects,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("beyond the end"), "{e}");
        let e = read_log(
            &log,
            &schema,
            &BTreeMap::from([(0, 20), (1, 10)]),
            None,
            true,
            &mut rejects,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("no samples to train on"), "{e}");
    }
}
