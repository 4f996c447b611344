//! The offline driver behind `freshet train`: daily (T+1) training on files or on the node's
//! sample log, through the same [`Trainer`] and ShardOwner actors the online pipeline uses.
//!
//! One run: start from a fresh model or a version of a model store ([`OfflineStart`]), read
//! the training and test rows (malformed ones to the reject file), train the epochs with the
//! next step's keys gathered ahead, evaluate after each epoch, and write versions to `--out`
//! on the checkpoint schedule and at the end. A version written from the sample log records
//! the offsets of exactly the rows it holds, as the online trainer's versions do, so online
//! training can resume after it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

use super::{boundary, trainer_at, FreshModel, Lineage, Trainer};
use crate::ckpt::writer::{CheckpointHandle, Schedule, WriterArgs};
use crate::ckpt::{Manifest, ModelStore};
use crate::dense::{ModelKind, Threads};
use crate::embedding::ShardSnapshot;
use crate::embedding::TableConfig;
use crate::metrics::{auc, evaluate, Evaluation};
use crate::sample::criteo::{self, CriteoParser};
use crate::sample::json::{read_jsonl, read_msgpack, SampleDecoder};
use crate::sample::RejectReason;
use crate::sample::{Format, RejectSink, RejectStats, SampleBlock, Schema};
use crate::shard::ShardRouter;
use crate::stream::StreamLog;
use crate::TableName;

/// Where an offline run starts.
#[derive(Clone, Debug)]
pub enum OfflineStart {
    /// A fresh model.
    Fresh(FreshModel),
    /// A version of the model store `store` (the newest when `version` is `None`), re-routed
    /// into the run's shard count whatever count it was written with. `model`, when given, must
    /// be the stored model's kind.
    Init {
        store: PathBuf,
        version: Option<u64>,
        model: Option<ModelKind>,
    },
}

/// Where the versions of a run go.
#[derive(Clone, Debug)]
pub struct OfflineOut {
    pub store: PathBuf,
    pub schedule: Schedule,
}

/// Everything one offline run needs.
#[derive(Clone, Debug)]
pub struct OfflineJob {
    pub start: OfflineStart,
    /// Training files, read in order (empty when training on `log`).
    pub data: Vec<PathBuf>,
    pub format: Format,
    /// Test files. Without them the last `holdout` of the rows are held out instead.
    pub test: Vec<PathBuf>,
    /// The share of the rows (of each log partition's range) held out as the test set when
    /// there are no test files, in `0.0..1.0`. 0: train on every row, test on none.
    pub holdout: f64,
    /// Where to write one click probability per test row, in order, after the last epoch.
    pub predictions: Option<PathBuf>,
    /// The sample log to train on instead of files, from the start (or the `Init` version's
    /// offsets) to its end now.
    pub log: Option<Arc<dyn StreamLog>>,
    pub epochs: u32,
    pub batch: usize,
    pub threads: usize,
    pub shards: u32,
    /// Rows to make room for in each table, spread over the shards.
    pub reserve_rows: Option<u64>,
    /// Read at most this many rows.
    pub max_rows: Option<usize>,
    /// The reject file.
    pub rejects: PathBuf,
    /// Where tables with a DRAM budget spill.
    pub spill_dir: PathBuf,
    pub out: Option<OfflineOut>,
    /// Where the shard owners run: `None` in this process, else on the nodes the placer
    /// chooses (`freshet train --join`).
    pub placer: Option<Arc<dyn crate::shard::ShardPlacer>>,
}

/// How a run reports progress: the caller draws it (a line rewritten in place on a terminal,
/// say); the driver only says what to draw.
pub trait Progress {
    /// Work under way: `at` of `total` units done (a new total starts a new phase); `msg`
    /// says what, and is called only when drawn.
    fn tick(&mut self, at: u64, total: Option<u64>, msg: &dyn Fn() -> String);
    /// A phase finished.
    fn done(&mut self, msg: &str);
    /// A one-off notice.
    fn note(&mut self, msg: &str);
}

/// Progress that draws nothing.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn tick(&mut self, _: u64, _: Option<u64>, _: &dyn Fn() -> String) {}
    fn done(&mut self, _: &str) {}
    fn note(&mut self, _: &str) {}
}

/// Rows one of `shards` shards reserves so that `total` keys, spread by the shard hash, fit
/// in every shard: the even share plus four standard deviations of a shard's binomial count.
fn reserve_per_shard(total: u64, shards: u32) -> u64 {
    let even = total.div_ceil(u64::from(shards.max(1)));
    even + (4.0 * (even as f64).sqrt()).ceil() as u64
}

/// What an offline run did: the JSON line `freshet train` prints.
#[derive(Debug, Serialize)]
pub struct OfflineReport {
    pub model: &'static str,
    pub rows: u64,
    pub rejected_rows: u64,
    pub rejects: RejectStats,
    pub reject_file: PathBuf,
    pub train_rows: u64,
    pub test_rows: u64,
    pub epochs: u32,
    pub batch: usize,
    pub threads: usize,
    pub shards: u32,
    pub steps: u64,
    /// Training only: parsing and evaluation are excluded.
    pub samples_per_sec: f64,
    /// Floats of the rows every training step looked up, summed: what the lookups must bring
    /// from the shards, and the pushes take back, at the least.
    pub row_floats: u64,
    pub train_seconds: f64,
    pub parse_seconds: f64,
    pub train_logloss: f64,
    pub test_auc: Option<f64>,
    pub test_logloss: f64,
    pub test_calibration: Option<f64>,
    /// The AUC of the generator's true probabilities on the test rows, when a `<test>.prob`
    /// file lies beside the test data.
    pub oracle_auc: Option<f64>,
    pub per_epoch: Vec<EpochReport>,
    pub out: Option<PathBuf>,
    /// The store version holding the final model (with --out).
    pub version: Option<u64>,
}

/// One epoch of an offline run.
#[derive(Debug, Serialize)]
pub struct EpochReport {
    pub epoch: u32,
    pub train_logloss: f64,
    pub samples_per_sec: f64,
    pub test: Evaluation,
}

/// Runs `job` to its end and reports what it did.
pub async fn run(job: OfflineJob, progress: &mut dyn Progress) -> anyhow::Result<OfflineReport> {
    let threads = Threads::new(job.threads)?;
    let batch = job.batch;
    check_args(batch, job.epochs, job.log.is_some(), job.holdout)?;
    // The model: fresh, or a version of --init, re-routed into `job.shards` shards whatever
    // count it was written with. The version is read and checked whole before any data is
    // read, so a bad version fails at once.
    let begin = match &job.start {
        OfflineStart::Init {
            store: dir,
            version,
            model,
        } => {
            let store = ModelStore::open_existing(dir)
                .with_context(|| format!("opening --init {}", dir.display()))?;
            let v = match version {
                Some(v) => *v,
                None => store
                    .latest()?
                    .with_context(|| format!("--init {} holds no model version", dir.display()))?,
            };
            let r = store
                .restore(v, Some(job.shards))
                .with_context(|| init_context(dir, v))?;
            progress.note(&format!(
                "restored version {v} of {} (step {})",
                dir.display(),
                r.manifest.step
            ));
            if let Some(k) = model {
                if *k != r.manifest.model.kind {
                    bail!(
                        "--model {} but the model in --init is {}",
                        k.name(),
                        r.manifest.model.kind.name()
                    );
                }
            }
            let trainer = trainer_at(&r.manifest, r.dense)
                .context("the model in --init does not fit its own tables")?;
            Begin::Init {
                trainer: Box::new(trainer),
                manifest: Box::new(r.manifest),
                shards: r.shards,
            }
        }
        OfflineStart::Fresh(f) => Begin::Fresh(f.clone()),
    };
    let (rows_before, rejected_before, log_start) = match &begin {
        Begin::Init { manifest: m, .. } => {
            (m.rows_trained, m.samples_rejected, m.sample_offsets.clone())
        }
        Begin::Fresh(_) => (0, 0, BTreeMap::new()),
    };
    let (schema, mut tables): (Schema, Vec<(String, TableConfig)>) = match &begin {
        Begin::Init { manifest: m, .. } => {
            (m.schema.clone(), m.tables.clone().into_iter().collect())
        }
        Begin::Fresh(f) => (f.schema.clone(), f.tables.clone().into_iter().collect()),
    };

    let (mut trainer, restore): (Trainer, Vec<Option<ShardSnapshot>>) = match begin {
        Begin::Init {
            trainer, shards, ..
        } => (*trainer, shards.into_iter().map(Some).collect()),
        Begin::Fresh(f) => (Trainer::new(f.schema, f.model)?, Vec::new()),
    };
    trainer.set_samples_per_update(batch);

    // Checked before the data is read, so a bad value fails at once.
    if let Some(n) = job.reserve_rows {
        let per_shard = reserve_per_shard(n, job.shards);
        for (name, c) in &mut tables {
            c.reserve_rows = per_shard;
            c.validate(&format!("embedding.tables.{name}"))
                .map_err(|e| anyhow::anyhow!("--reserve-rows {n}: {e}"))?;
        }
    }

    // Data.
    let reject_path = job.rejects.clone();
    if let Some(p) = reject_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let mut rejects = RejectSink::to_file(&reject_path)?;
    let t0 = Instant::now();
    let mut log_positions = None;
    let (train_block, test_block, oracle) = if let Some(log) = &job.log {
        let read = read_log(
            log.as_ref(),
            &schema,
            &log_start,
            job.max_rows,
            if job.test.is_empty() {
                job.holdout
            } else {
                0.0
            },
            &mut rejects,
            progress,
        )?;
        log_positions = Some(read.positions);
        if job.test.is_empty() {
            (read.train, read.test, None)
        } else {
            let test = read_files(&job.test, job.format, &schema, &mut rejects, None)?;
            let oracle = oracle_probabilities(&test);
            (read.train, test.block, oracle)
        }
    } else {
        let data = read_files(&job.data, job.format, &schema, &mut rejects, job.max_rows)?;
        if job.test.is_empty() {
            let n = data.block.len();
            let split = n - held(n as u64, job.holdout) as usize;
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
            let test = read_files(&job.test, job.format, &schema, &mut rejects, None)?;
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

    // Shards, then the model in them.
    let table_list: Vec<(TableName, TableConfig)> = tables
        .iter()
        .map(|(n, c)| (TableName::new(n), c.clone()))
        .collect();
    let reserving = table_list.iter().any(|(_, c)| c.reserve_rows > 0);
    let shards_start = Instant::now();
    let spill = table_list
        .iter()
        .any(|(_, c)| c.dram_budget_bytes.is_some())
        .then_some(job.spill_dir.as_path());
    let router = match &job.placer {
        Some(placer) => placer
            .place(job.shards, table_list, restore)
            .await
            .context("placing the shard owners on the cluster")?,
        None => ShardRouter::spawn_local(job.shards, table_list, spill, restore)
            .await
            .context("starting the shard owners")?,
    };
    if reserving {
        progress.note(&format!(
            "shards reserved their rows in {:.1}s",
            shards_start.elapsed().as_secs_f64()
        ));
    }
    let ckpt = match &job.out {
        Some(out) => {
            let store = ModelStore::open(&out.store)
                .with_context(|| format!("opening --out {}", out.store.display()))?;
            let (h, _join) = CheckpointHandle::spawn(WriterArgs {
                store,
                shards: router.clone(),
                schedule: out.schedule.clone(),
                // Offline training reads a fixed range; nothing resumes from these offsets.
                samples: None,
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
    let lineage = |rows: u64| {
        let (sample_offsets, refused) = match &log_positions {
            Some(p) => p.at(rows as usize),
            None => (BTreeMap::new(), 0),
        };
        Lineage {
            rows_trained: rows_before + rows,
            samples_rejected: rejected_before + refused,
            replays: Vec::new(),
            sample_offsets,
        }
    };

    let n = train_block.len();
    progress.note(&format!(
        "training {} on {n} rows ({} refused), {} test rows, batch {batch}, {} threads, {} shards",
        trainer.net().config().kind.name(),
        stats.total,
        test_block.len(),
        threads.count(),
        job.shards
    ));
    let mut per_epoch = Vec::new();
    let mut train_secs = 0.0;
    let mut last_loss = 0.0;
    let mut steps = 0u64;
    let mut rows_done = 0u64;
    let mut row_floats = 0u64;
    for epoch in 1..=job.epochs {
        let start = Instant::now();
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        // A model restored with part of a dense update pending completes it first.
        let first = trainer.rows_to_update().unwrap_or(batch).min(batch);
        let ranges = step_ranges(n, first, batch);
        for (i, rows) in ranges.iter().enumerate() {
            // The next step's keys are deduplicated while this one waits for its rows.
            let next = ranges.get(i + 1).cloned();
            let rep = trainer
                .train_batch_ahead(&train_block, rows.clone(), next, &router, &threads)
                .await?;
            steps += 1;
            row_floats += rep.row_floats as u64;
            loss_sum += rep.loss_sum;
            seen += rep.rows;
            rows_done += rep.rows as u64;
            if let Some(ck) = ckpt.as_ref().filter(|ck| ck.due(trainer.step())) {
                trainer.flush().await?;
                ck.capture(boundary(&trainer, &table_map, lineage(rows_done)))
                    .await
                    .context("taking a checkpoint")?;
            }
            progress.tick(seen as u64, Some(n as u64), &|| {
                format!(
                    "epoch {epoch}/{}, loss {:.4}",
                    job.epochs,
                    loss_sum / seen.max(1) as f64
                )
            });
        }
        // The epoch ends when its last gradients are applied.
        trainer.flush().await?;
        let secs = start.elapsed().as_secs_f64();
        train_secs += secs;
        last_loss = loss_sum / seen.max(1) as f64;
        let (test, preds) =
            evaluate_block(&mut trainer, &test_block, batch, &router, &threads).await?;
        if let (Some(path), true) = (&job.predictions, epoch == job.epochs) {
            write_predictions(path, &preds)?;
        }
        progress.done(&format!(
            "epoch {epoch}/{}: {n} rows in {secs:.1}s ({:.0} rows/s), train loss {last_loss:.4}, \
             test auc {}, logloss {:.4}",
            job.epochs,
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
    if let (Some(ck), Some(out)) = (&ckpt, &job.out) {
        // The final model is one more version, at the last step boundary.
        ck.capture(boundary(&trainer, &table_map, lineage(rows_done)))
            .await
            .context("capturing the final model")?;
        let st = ck.flush().await.context("writing the final model")?;
        ck.stop();
        if st.write_failures > 0 {
            bail!(
                "{} of {} versions could not be written to {}: {}",
                st.write_failures,
                st.captures,
                out.store.display(),
                st.last_error.unwrap_or_default()
            );
        }
        version = st.last_version;
        progress.note(&format!(
            "model written to {} as version {} ({} full, {} delta versions this run)",
            out.store.display(),
            version.unwrap_or(0),
            st.full_written,
            st.deltas_written
        ));
    }
    router.stop();

    Ok(OfflineReport {
        model: trainer.net().config().kind.name(),
        rows: (n + test_block.len()) as u64,
        rejected_rows: stats.total,
        rejects: stats,
        reject_file: reject_path,
        train_rows: n as u64,
        test_rows: test_block.len() as u64,
        epochs: job.epochs,
        batch,
        threads: threads.count(),
        shards: job.shards,
        steps,
        samples_per_sec: (n as f64 * f64::from(job.epochs)) / train_secs.max(1e-9),
        row_floats,
        train_seconds: train_secs,
        parse_seconds,
        train_logloss: last_loss,
        test_auc: final_test.auc,
        test_logloss: final_test.logloss,
        test_calibration: final_test.calibration,
        oracle_auc,
        per_epoch,
        out: job.out.as_ref().map(|o| o.store.clone()),
        version,
    })
}

/// An [`OfflineStart`] resolved: the fresh model, or the restored version (its trainer, its
/// manifest and its shards, re-routed).
enum Begin {
    Fresh(FreshModel),
    Init {
        trainer: Box<Trainer>,
        manifest: Box<Manifest>,
        shards: Vec<ShardSnapshot>,
    },
}

/// Refuses arguments no run can use, before anything is opened: a caller that must take a lock
/// or open a log for the run checks them first too.
/// Steps over `n` rows: `first` rows, then `batch` at a time.
fn step_ranges(n: usize, first: usize, batch: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::with_capacity(n / batch.max(1) + 2);
    let mut s = 0;
    let mut len = first.max(1);
    while s < n {
        out.push(s..(s + len).min(n));
        s += len;
        len = batch.max(1);
    }
    out
}

pub fn check_args(batch: usize, epochs: u32, from_log: bool, holdout: f64) -> anyhow::Result<()> {
    if batch == 0 {
        bail!("invalid value 0 for `--batch`: expected a positive batch size");
    }
    if from_log && epochs != 1 {
        bail!(
            "--from-log trains each sample of the log once (the version records which \
             samples it holds, and online training resumes after them): use --epochs 1"
        );
    }
    if !(0.0..1.0).contains(&holdout) {
        bail!("invalid value {holdout} for `--holdout`: expected a share of the rows in 0..1");
    }
    Ok(())
}

/// What a failed restore of `--init` says: which version, and how to find a good one.
fn init_context(dir: &std::path::Path, v: u64) -> String {
    format!(
        "restoring version {v} of --init {} (`freshet ckpt verify --store {}` shows which \
         versions are good; --init-version picks one)",
        dir.display(),
        dir.display()
    )
}

async fn evaluate_block(
    trainer: &mut Trainer,
    block: &SampleBlock,
    batch: usize,
    router: &ShardRouter,
    threads: &Threads,
) -> anyhow::Result<(Evaluation, Vec<f32>)> {
    let mut preds = Vec::with_capacity(block.len());
    for s in (0..block.len()).step_by(batch.max(1)) {
        let p = trainer
            .predict_batch(block, s..(s + batch).min(block.len()), router, threads)
            .await?;
        preds.extend(p);
    }
    let labels: Vec<f32> = block.ctr_labels().collect();
    let ev = evaluate(&preds, &labels);
    Ok((ev, preds))
}

/// Writes one probability per line, in the test rows' order, through a temporary file renamed
/// into place: a reader never sees half a file.
fn write_predictions(path: &std::path::Path, preds: &[f32]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(f);
    for p in preds {
        writeln!(w, "{p:.6}").with_context(|| format!("writing {}", tmp.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
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

/// Rows of `n` held out at share `holdout`: rounded down, so that a share of 0.1 holds out
/// `n / 10`.
fn held(n: u64, holdout: f64) -> u64 {
    ((n as f64 * holdout) as u64).min(n)
}

/// Reads every partition of the sample log from `start` (or its low watermark) to its high
/// watermark now, round-robin in chunks so that training sees the partitions interleaved as
/// the online trainer does. The last `holdout` of each partition's range is the
/// test set and is not recorded as consumed. `max_rows` caps the records read, split evenly
/// over the partitions. Refused records go to `rejects`, as they would go to the online
/// trainer's dead-letter topic.
fn read_log(
    log: &dyn StreamLog,
    schema: &Schema,
    start: &BTreeMap<u32, u64>,
    max_rows: Option<usize>,
    holdout: f64,
    rejects: &mut RejectSink,
    progress: &mut dyn Progress,
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
            progress.note(&format!(
                "sample partition {p}: offsets {want}..{low} were deleted by retention before \
                 this run; reading from {low}"
            ));
        }
        let from = want.max(low);
        let end = quota.map_or(high, |q| high.min(from + q));
        let cut = end - held(end - from, holdout);
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
                match super::feed::decode(&decoder, rec, p, block) {
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
            progress.tick(read, Some(total), &|| "reading the sample log".into());
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use std::path::Path;

    use crate::event::SAMPLES_TOPIC;
    use crate::stream::{EmbeddedLog, LogConfig};
    use crate::testkit::fixtures::joined_sample;

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
        let r = read_log(
            &log,
            &schema,
            &BTreeMap::new(),
            None,
            0.1,
            &mut rejects,
            &mut Quiet,
        )
        .unwrap();
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
        let r = read_log(
            &log,
            &schema,
            &start,
            Some(6),
            0.0,
            &mut rejects,
            &mut Quiet,
        )
        .unwrap();
        assert_eq!((r.train.len(), r.test.len()), (6, 0));
        assert_eq!(r.positions.at(6), (BTreeMap::from([(0, 13), (1, 7)]), 0));
        assert_eq!(r.positions.at(0).0, start);

        // Offsets beyond the log, and nothing left to read, are refused.
        let e = read_log(
            &log,
            &schema,
            &BTreeMap::from([(1, 11)]),
            None,
            0.1,
            &mut rejects,
            &mut Quiet,
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
            0.1,
            &mut rejects,
            &mut Quiet,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("no samples to train on"), "{e}");
    }
}
