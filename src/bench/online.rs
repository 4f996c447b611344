//! `freshet bench online`: what online learning buys, on a time-ordered stream, in one run.
//!
//! The stream (the simulator by default, or a JSON-lines file with `--data`) is split at the
//! period boundary nearest its middle. The first half is history; every figure is measured on
//! the second half, each impression predicted before its label is known (progressive
//! validation):
//! - **static**: `freshet train`'s driver on the first half, scoring the whole second half;
//! - **daily**: the same start, then one incremental job (`train --init`) per period of the
//!   second half, each period scored by the model trained up to the period before it;
//! - **online**: a node as `freshet dev` runs it, on the configured defaults, fed the stream's
//!   events (impressions, then their clicks) through its event log. The first half is played at
//!   the highest rate of `--rates`, then the bench waits until serving holds every sample, and
//!   plays the second half at the run's rate. Every impression is scored by the serving
//!   replica's current version just before its event is appended, as an application scores a
//!   request and logs what it showed;
//! - **zero-lag**: the same model trained one sample at a time, each sample scored before it
//!   is trained on: the online pipeline with no lag at all, its ideal;
//! - **zero-lag logistic**: a hashed logistic regression with per-coordinate Adagrad, updated
//!   after every sample: a simple learner with no lag, for scale.
//!
//! Serving lag, at every prediction of the online runs: the samples the sample log held beyond
//! the served version's offsets, and how long ago the oldest of them was appended (0 when the
//! served version holds them all).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use freshet_actors::dense::Threads;
use freshet_actors::event::{Action, Event, Features, Impression, Snapshot};
use freshet_actors::metrics::{auc, auc_standard_error};
use freshet_actors::online::pipeline::PipelineHandle;
use freshet_actors::sample::hash::{field_salt, salted_id};
use freshet_actors::sample::json::{RawField, RawSample, RawValue, SampleDecoder};
use freshet_actors::sample::{Format, SampleBlock, Schema};
use freshet_actors::shard::ShardRouter;
use freshet_actors::simulate::{SimConfig, Simulator};
use freshet_actors::stream::{now_ms, partition_of, StreamLog};
use freshet_actors::training::offline::{self, OfflineJob, OfflineOut, OfflineStart, Quiet};
use freshet_actors::training::{FreshModel, Trainer};
use freshet_actors::TableName;
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct OnlineArgs {
    /// A time-ordered stream of impressions, one JSON object per line: a sample as
    /// `freshet train --format jsonl` reads it (`labels`, `dense`, `sparse`, docs/schema.md)
    /// with its event time `time_ms`, and optionally `label_delay_ms` (how long after the
    /// impression its labels arrived; default 0). Lines out of time order are sorted;
    /// malformed lines, and samples the schema refuses, are counted and left out. Without
    /// --data, the simulator plays the stream.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Read at most this many lines of --data.
    #[arg(long)]
    max_rows: Option<usize>,
    /// Impressions the simulator plays.
    #[arg(long, default_value_t = 40_000)]
    sim_impressions: u64,
    /// Days of event time the simulated stream spans.
    #[arg(long, default_value_t = 8.0)]
    sim_days: f64,
    /// Event rates (impressions and clicks per second) of the online runs' second half: one
    /// run per rate.
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    rates: Vec<f64>,
    /// The batch retrain period, in milliseconds of event time (one day).
    #[arg(long, default_value_t = 86_400_000)]
    period_ms: i64,
    /// Version interval (the delta interval), in milliseconds; `freshet dev`'s default.
    #[arg(long, default_value_t = 250)]
    delta_ms: u64,
    /// Keep the batch jobs' files here (the history and each period as JSON lines, the daily
    /// model store, every job's predictions) instead of in a temporary directory.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Print one JSON object instead of an indented one.
    #[arg(long)]
    json: bool,
}

/// One impression of the stream: its sample (features and labels), when it was shown, and
/// when its labels arrived.
#[derive(Clone, Debug)]
struct Row {
    time_ms: i64,
    label_ms: i64,
    user: String,
    item: String,
    sample: RawSample,
}

/// The stream, checked against the schema: every row decodes.
struct Dataset {
    source: String,
    rows: Vec<Row>,
    /// The first row of the second half.
    split: usize,
    /// Each row's label (the schema's first), in row order.
    labels: Vec<f32>,
    /// The simulator's true click probability of each row.
    truth: Option<Vec<f32>>,
    rejected: u64,
    reordered: bool,
    /// The simulator's settings, when it played the stream.
    sim: Option<SimConfig>,
}

impl Dataset {
    fn eval_labels(&self) -> &[f32] {
        &self.labels[self.split..]
    }
}

/// A line of `--data`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimedSample {
    time_ms: i64,
    #[serde(default)]
    label_delay_ms: i64,
    labels: BTreeMap<String, f64>,
    #[serde(default)]
    dense: BTreeMap<String, f64>,
    #[serde(default)]
    sparse: BTreeMap<String, RawField>,
    #[serde(default)]
    weight: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    source: String,
    rows: usize,
    rejected_rows: u64,
    history_rows: usize,
    evaluated_rows: usize,
    evaluated_positives: usize,
    periods_evaluated: usize,
    model: &'static str,
    publish: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    simulator: Option<SimConfig>,
    /// The AUC of the simulator's true probabilities: the best any model can do.
    #[serde(skip_serializing_if = "Option::is_none")]
    oracle_auc: Option<f64>,
    /// What chance alone moves an AUC by on the evaluated rows (its standard error at the
    /// zero-lag AUC): differences below about twice it are noise.
    auc_standard_error: Option<f64>,
    static_auc: Option<f64>,
    daily_auc: Option<f64>,
    zero_lag_auc: Option<f64>,
    zero_lag_logistic_auc: Option<f64>,
    /// Each period of the second half: what the static and the daily models scored on it.
    periods: Vec<PeriodAuc>,
    online: Vec<OnlineRun>,
}

#[derive(Debug, Serialize)]
struct PeriodAuc {
    rows: usize,
    positives: usize,
    static_auc: Option<f64>,
    daily_auc: Option<f64>,
}

#[derive(Debug, Serialize)]
struct OnlineRun {
    rate_asked: f64,
    events_per_sec: f64,
    auc: Option<f64>,
    /// online AUC minus the daily batch's and minus the zero-lag model's.
    beats_daily_by: Option<f64>,
    behind_zero_lag_by: Option<f64>,
    lag_samples_p50: u64,
    lag_samples_p99: u64,
    lag_ms_p50: f64,
    lag_ms_p99: f64,
    lag_ms_max: f64,
    /// Impressions scored before any version was served (scored 0.5).
    unserved_predictions: usize,
    versions_served: usize,
    versions_withdrawn: u64,
    samples_per_sec_trained: f64,
}

pub(crate) fn run(args: OnlineArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.rates.is_empty() && args.rates.iter().all(|r| r.is_finite() && *r > 0.0),
        "--rates must be positive event rates, as 100,10000"
    );
    anyhow::ensure!(args.period_ms > 0, "--period-ms must be positive");
    anyhow::ensure!(
        args.sim_days > 0.0 && args.sim_days.is_finite() && args.sim_impressions >= 100,
        "--sim-days must be positive and --sim-impressions at least 100"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let schema = settings.schema.clone();
    let ds = match &args.data {
        Some(path) => load_jsonl(path, args.max_rows, &schema, args.period_ms)?,
        None => simulate(&args, &schema)?,
    };
    let eval = ds.eval_labels();
    let positives = eval.iter().filter(|&&l| l > 0.5).count();
    super::progress(&format!(
        "{}: {} rows ({} refused{}), {} of history, {} evaluated ({} positive)",
        ds.source,
        ds.rows.len(),
        ds.rejected,
        if ds.reordered { ", sorted by time" } else { "" },
        ds.split,
        eval.len(),
        positives
    ));
    anyhow::ensure!(
        positives > 0 && positives < eval.len(),
        "the second half needs positive and negative labels to have an AUC"
    );
    let tmp = tempfile::tempdir().context("a temporary directory")?;
    let dir = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            anyhow::ensure!(
                std::fs::read_dir(d)?.next().is_none(),
                "--work-dir {} is not empty",
                d.display()
            );
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };

    super::progress("static and daily batch training");
    let (static_p, daily_p, period_rows) = rt.block_on(batch(&ds, settings, &dir, &args))?;
    let mut by_period = Vec::new();
    let mut at = 0;
    for n in period_rows {
        let y = &eval[at..at + n];
        by_period.push(PeriodAuc {
            rows: n,
            positives: y.iter().filter(|&&l| l > 0.5).count(),
            static_auc: auc(&static_p[at..at + n], y),
            daily_auc: auc(&daily_p[at..at + n], y),
        });
        at += n;
    }
    super::progress("zero-lag model, one sample at a time");
    let zero_p = rt.block_on(zero_lag(&ds, settings, &dir.join("spill")))?;
    let lr_p = zero_lag_logistic(&ds);
    let daily_auc = auc(&daily_p, eval);
    let zero_lag_auc = auc(&zero_p, eval);
    let mut online = Vec::new();
    let fastest = args.rates.iter().copied().fold(0.0, f64::max);
    for &rate in &args.rates {
        super::progress(&format!(
            "online at {rate} events/s (the {} rows of history at {fastest} events/s first)",
            ds.split
        ));
        let r = rt.block_on(online_run(&ds, rate, fastest, &args, settings))?;
        let (scores, mut run) = r;
        run.auc = auc(&scores, eval);
        run.beats_daily_by = run.auc.zip(daily_auc).map(|(a, b)| a - b);
        run.behind_zero_lag_by = run.auc.zip(zero_lag_auc).map(|(a, b)| b - a);
        super::progress(&format!(
            "  auc {}, lag p99 {} samples / {:.0} ms",
            run.auc.map_or("-".into(), |a| format!("{a:.4}")),
            run.lag_samples_p99,
            run.lag_ms_p99
        ));
        online.push(run);
    }
    let report = Report {
        cpu: super::cpu_model(),
        source: ds.source.clone(),
        rows: ds.rows.len(),
        rejected_rows: ds.rejected,
        history_rows: ds.split,
        evaluated_rows: eval.len(),
        evaluated_positives: positives,
        periods_evaluated: by_period.len(),
        model: settings.model.kind.name(),
        publish: settings.validation.publish.name(),
        simulator: ds.sim.clone(),
        oracle_auc: ds.truth.as_ref().and_then(|t| auc(&t[ds.split..], eval)),
        auc_standard_error: zero_lag_auc
            .map(|a| auc_standard_error(a, positives as f64, (eval.len() - positives) as f64)),
        static_auc: auc(&static_p, eval),
        daily_auc,
        zero_lag_auc,
        zero_lag_logistic_auc: auc(&lr_p, eval),
        periods: by_period,
        online,
    };
    super::print_report(&report, args.json)
}

/// Splits `rows` (in time order) at the period boundary nearest the middle row.
fn split_at_period(rows: &[Row], period_ms: i64) -> usize {
    let n = rows.len();
    let mid = rows[n / 2].time_ms;
    let lo = mid.div_euclid(period_ms) * period_ms;
    let index_of = |t: i64| rows.partition_point(|r| r.time_ms < t);
    let (a, b) = (index_of(lo), index_of(lo + period_ms));
    let best = if (n / 2).abs_diff(a) <= b.abs_diff(n / 2) {
        a
    } else {
        b
    };
    // A stream within one period still gets two halves.
    if best == 0 || best >= n {
        n / 2
    } else {
        best
    }
}

/// Checks each row against the schema; returns the rows that decode, their labels, and the
/// count refused.
fn check_rows(rows: Vec<Row>, schema: &Schema) -> (Vec<Row>, Vec<f32>, u64, Vec<bool>) {
    let decoder = SampleDecoder::new(schema);
    let mut block = SampleBlock::for_schema(schema);
    let mut kept = Vec::with_capacity(rows.len());
    let mut keep = Vec::with_capacity(rows.len());
    let mut rejected = 0;
    for r in rows {
        match decoder.push(&r.sample, &mut block) {
            Ok(()) => {
                kept.push(r);
                keep.push(true);
            }
            Err(e) => {
                if rejected < 5 {
                    super::progress(&format!("  refused a sample at {}: {e}", r.time_ms));
                }
                rejected += 1;
                keep.push(false);
            }
        }
    }
    let labels = block.ctr_labels().collect();
    (kept, labels, rejected, keep)
}

fn load_jsonl(
    path: &Path,
    max_rows: Option<usize>,
    schema: &Schema,
    period_ms: i64,
) -> anyhow::Result<Dataset> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut rows = Vec::new();
    let mut bad = 0u64;
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        if max_rows.is_some_and(|m| n >= m) {
            break;
        }
        let line = line.with_context(|| format!("reading {} line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<TimedSample>(&line) {
            Ok(t) if t.label_delay_ms >= 0 => rows.push(row_of(n, t)),
            Ok(_) => {
                bad += 1;
                super::progress(&format!("  line {}: label_delay_ms is negative", n + 1));
            }
            Err(e) => {
                if bad < 5 {
                    super::progress(&format!("  line {} refused: {e}", n + 1));
                }
                bad += 1;
            }
        }
    }
    let reordered = rows.windows(2).any(|w| w[1].time_ms < w[0].time_ms);
    rows.sort_by_key(|r| r.time_ms);
    let (rows, labels, refused, _) = check_rows(rows, schema);
    anyhow::ensure!(
        rows.len() >= 100,
        "{}: {} usable rows; the bench needs at least 100",
        path.display(),
        rows.len()
    );
    let split = split_at_period(&rows, period_ms);
    Ok(Dataset {
        source: path.display().to_string(),
        rows,
        split,
        labels,
        truth: None,
        rejected: bad + refused,
        reordered,
        sim: None,
    })
}

fn row_of(n: usize, t: TimedSample) -> Row {
    let text = |name: &str| match t.sparse.get(name) {
        Some(RawField::One(RawValue::Str(s))) => Some(s.clone()),
        Some(RawField::One(RawValue::Int(i))) => Some(i.to_string()),
        _ => None,
    };
    Row {
        time_ms: t.time_ms,
        label_ms: t.time_ms.saturating_add(t.label_delay_ms),
        user: text("user").unwrap_or_else(|| "-".into()),
        item: text("item").unwrap_or_else(|| format!("i{n}")),
        sample: RawSample {
            labels: t.labels,
            dense: t.dense,
            sparse: t.sparse,
            weight: t.weight,
        },
    }
}

/// The simulator's stream: clean (no duplicates, disorder or malformed events, which the
/// quality figures do not need), spread over `--sim-days` of event time ending an hour ago,
/// with its ids and effects drifting one way: the hidden per-id effects turn by a quarter turn
/// over the whole stream (they rotate, so a longer turn would bring old effects back and make old
/// data look fresh), and a tenth of the items are new each day.
fn simulate(args: &OnlineArgs, schema: &Schema) -> anyhow::Result<Dataset> {
    let span_ms = args.sim_days * 86_400_000.0;
    let items = 5_000u64;
    let cfg = SimConfig {
        seed: 7,
        world_seed: 7,
        users: 20_000,
        items,
        rate: args.sim_impressions as f64 / (span_ms / 1000.0),
        start_ms: now_ms() - span_ms as i64 - 3_600_000,
        click_delay_median_ms: 5_000.0,
        click_delay_sigma: 1.0,
        new_items_per_hour: items as f64 / 10.0 / 24.0,
        drift_per_hour: 1.0 / (args.sim_days * 24.0),
        duplicate_rate: 0.0,
        out_of_order_rate: 0.0,
        malformed_rate: 0.0,
        ..SimConfig::default()
    };
    let mut sim = Simulator::new(cfg.clone())?;
    let (mut recs, mut truth) = (Vec::new(), Vec::new());
    let mut impressions: Vec<Impression> = Vec::new();
    let mut clicks: HashMap<(String, String), i64> = HashMap::new();
    let mut take = |recs: &mut Vec<freshet_actors::simulate::SimRecord>,
                    impressions: &mut Vec<Impression>| {
        for r in recs.drain(..) {
            match Event::from_msgpack(&r.payload) {
                Ok(Event::Impression(i)) => impressions.push(i),
                Ok(Event::Action(a)) => {
                    clicks.entry((a.request_id, a.item)).or_insert(a.time_ms);
                }
                Err(_) => {}
            }
        }
    };
    let mut probability: HashMap<(String, String), f32> = HashMap::new();
    while sim.stats().impressions < args.sim_impressions {
        sim.next_request(&mut recs, &mut truth);
        for t in truth.drain(..) {
            probability.insert((t.request_id, t.item), t.probability as f32);
        }
        take(&mut recs, &mut impressions);
    }
    sim.finish(&mut recs);
    take(&mut recs, &mut impressions);
    let mut rows = Vec::with_capacity(impressions.len());
    let mut truths = Vec::with_capacity(impressions.len());
    let label = schema
        .labels
        .first()
        .cloned()
        .unwrap_or_else(|| "click".into());
    for imp in impressions {
        let key = (imp.request_id.clone(), imp.item.clone());
        let features = imp
            .features
            .decode()
            .map_err(|e| anyhow::anyhow!("a simulated impression: {e}"))?;
        let click = clicks.get(&key).copied();
        truths.push(probability.get(&key).copied().unwrap_or(0.0));
        rows.push(Row {
            time_ms: imp.time_ms,
            label_ms: click.unwrap_or(imp.time_ms),
            user: imp.user,
            item: imp.item,
            sample: RawSample {
                labels: BTreeMap::from([(label.clone(), f64::from(u8::from(click.is_some())))]),
                dense: features.dense,
                sparse: features.sparse,
                weight: None,
            },
        });
    }
    // Requests come in time order; keep the truths beside their rows when sorting.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].time_ms);
    let rows: Vec<Row> = order.iter().map(|&i| rows[i].clone()).collect();
    let truths: Vec<f32> = order.iter().map(|&i| truths[i]).collect();
    let (rows, labels, rejected, keep) = check_rows(rows, schema);
    let truths = truths
        .into_iter()
        .zip(keep)
        .filter_map(|(t, k)| k.then_some(t))
        .collect();
    let split = split_at_period(&rows, args.period_ms);
    Ok(Dataset {
        source: format!(
            "simulator ({} impressions over {} days)",
            args.sim_impressions, args.sim_days
        ),
        rows,
        split,
        labels,
        truth: Some(truths),
        rejected,
        reordered: false,
        sim: Some(cfg),
    })
}

fn write_jsonl(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(f);
    for r in rows {
        serde_json::to_writer(&mut w, &r.sample)?;
        w.write_all(b"\n")?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))
}

fn read_predictions(path: &Path) -> anyhow::Result<Vec<f32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| {
            l.trim()
                .parse::<f32>()
                .with_context(|| format!("a prediction in {}: {l:?}", path.display()))
        })
        .collect()
}

/// Static and daily batch: `freshet train`'s driver on files. Returns the static and the
/// daily predictions of the second half, and the rows of each of its periods.
async fn batch(
    ds: &Dataset,
    settings: &Settings,
    dir: &Path,
    args: &OnlineArgs,
) -> anyhow::Result<(Vec<f32>, Vec<f32>, Vec<usize>)> {
    let eval = &ds.rows[ds.split..];
    let mut periods: Vec<&[Row]> = Vec::new();
    let mut start = 0;
    for i in 1..=eval.len() {
        if i == eval.len()
            || eval[i].time_ms.div_euclid(args.period_ms)
                != eval[start].time_ms.div_euclid(args.period_ms)
        {
            periods.push(&eval[start..i]);
            start = i;
        }
    }
    let history = dir.join("history.jsonl");
    write_jsonl(&history, &ds.rows[..ds.split])?;
    let mut files = Vec::new();
    for (k, p) in periods.iter().enumerate() {
        let f = dir.join(format!("period-{k}.jsonl"));
        write_jsonl(&f, p)?;
        files.push(f);
    }
    let all_eval = dir.join("eval.jsonl");
    write_jsonl(&all_eval, eval)?;
    let store = dir.join("daily-models");
    let schema = settings.schema.clone();
    let model = settings.model.clone();
    let tables = settings
        .model_tables(&schema, &model)?
        .into_iter()
        .collect();
    let job = |start: OfflineStart, data: PathBuf, test: PathBuf, preds: PathBuf| OfflineJob {
        start,
        data: vec![data],
        format: Format::Jsonl,
        test: vec![test],
        holdout: 0.0,
        predictions: Some(preds),
        log: None,
        epochs: 1,
        batch: settings.train.batch,
        threads: settings.train.threads,
        shards: settings.embedding.shards,
        reserve_rows: None,
        max_rows: None,
        rejects: dir.join("rejects.tsv"),
        spill_dir: dir.join("spill"),
        out: Some(OfflineOut {
            store: store.clone(),
            schedule: Default::default(),
        }),
        placer: None,
    };
    let static_preds = dir.join("static.txt");
    offline::run(
        job(
            OfflineStart::Fresh(FreshModel {
                schema,
                model,
                tables,
            }),
            history,
            all_eval,
            static_preds.clone(),
        ),
        &mut Quiet,
    )
    .await
    .context("the static model")?;
    let static_p = read_predictions(&static_preds)?;
    anyhow::ensure!(
        static_p.len() == eval.len(),
        "the static model skipped rows"
    );
    // The first period is scored by the model of the history, as the static one.
    let mut daily = static_p[..periods[0].len()].to_vec();
    for k in 1..periods.len() {
        let preds = dir.join(format!("daily-{k}.txt"));
        offline::run(
            job(
                OfflineStart::Init {
                    store: store.clone(),
                    version: None,
                    model: None,
                },
                files[k - 1].clone(),
                files[k].clone(),
                preds.clone(),
            ),
            &mut Quiet,
        )
        .await
        .with_context(|| format!("the daily job of period {k}"))?;
        let p = read_predictions(&preds)?;
        anyhow::ensure!(p.len() == periods[k].len(), "a daily job skipped rows");
        daily.extend(p);
    }
    Ok((static_p, daily, periods.iter().map(|p| p.len()).collect()))
}

fn block_of(schema: &Schema, rows: &[Row]) -> anyhow::Result<SampleBlock> {
    let decoder = SampleDecoder::new(schema);
    let mut block = SampleBlock::for_schema(schema);
    for r in rows {
        decoder
            .push(&r.sample, &mut block)
            .map_err(|e| anyhow::anyhow!("a checked sample no longer decodes: {e}"))?;
    }
    Ok(block)
}

/// The configured model, trained on one sample at a time, each sample of the second half
/// scored before it is trained on.
async fn zero_lag(ds: &Dataset, settings: &Settings, spill: &Path) -> anyhow::Result<Vec<f32>> {
    let schema = settings.schema.clone();
    let model = settings.model.clone();
    let tables: Vec<(TableName, _)> = settings
        .model_tables(&schema, &model)?
        .into_iter()
        .map(|(n, c)| (TableName::new(&n), c))
        .collect();
    let needs_spill = tables.iter().any(|(_, c)| c.dram_budget_bytes.is_some());
    let router = ShardRouter::spawn_local(
        settings.embedding.shards,
        tables,
        needs_spill.then_some(spill),
        vec![],
    )
    .await
    .context("starting the shard owners")?;
    let threads = Threads::new(1)?;
    let block = block_of(&schema, &ds.rows)?;
    let mut t = Trainer::new(schema, model)?;
    t.set_samples_per_update(settings.train.batch);
    let mut preds = Vec::with_capacity(ds.rows.len() - ds.split);
    let started = Instant::now();
    let mut last = Instant::now();
    for i in 0..block.len() {
        if i >= ds.split {
            preds.extend(t.predict_batch(&block, i..i + 1, &router, &threads).await?);
        }
        t.train_batch(&block, i..i + 1, &router, &threads).await?;
        if last.elapsed() >= Duration::from_secs(10) {
            last = Instant::now();
            super::progress(&format!(
                "  {i} of {} samples, {:.0} s",
                block.len(),
                started.elapsed().as_secs_f64()
            ));
        }
    }
    t.flush().await?;
    router.stop();
    Ok(preds)
}

/// A hashed logistic regression (2^22 weights, one per hashed feature, Adagrad per
/// coordinate), updated after every sample; the second half is scored before each update.
fn zero_lag_logistic(ds: &Dataset) -> Vec<f32> {
    const BITS: u32 = 22;
    const LR: f64 = 0.1;
    let mask = (1u64 << BITS) - 1;
    let mut w = vec![0f32; 1 << BITS];
    let mut g2 = vec![1f32; 1 << BITS];
    let mut preds = Vec::with_capacity(ds.rows.len() - ds.split);
    let mut idx: Vec<(usize, f32)> = Vec::new();
    for (i, r) in ds.rows.iter().enumerate() {
        idx.clear();
        idx.push((0, 1.0));
        for (name, &v) in &r.sample.dense {
            idx.push(((salted_id(field_salt(name), b"") & mask) as usize, v as f32));
        }
        for (name, field) in &r.sample.sparse {
            let values: Vec<&RawValue> = match field {
                RawField::One(v) => vec![v],
                RawField::Many(vs) => vs.iter().collect(),
                RawField::Weighted { values, .. } => values.iter().collect(),
            };
            for v in values {
                let bytes = match v {
                    RawValue::Int(n) => n.to_string().into_bytes(),
                    RawValue::Str(s) => s.clone().into_bytes(),
                };
                idx.push(((salted_id(field_salt(name), &bytes) & mask) as usize, 1.0));
            }
        }
        let z: f32 = idx.iter().map(|&(j, x)| w[j] * x).sum();
        let p = 1.0 / (1.0 + (-z.clamp(-30.0, 30.0)).exp());
        if i >= ds.split {
            preds.push(p);
        }
        let y = ds.labels[i];
        for &(j, x) in &idx {
            let g = (p - y) * x;
            g2[j] += g * g;
            w[j] -= (LR as f32) * g / g2[j].sqrt();
        }
    }
    preds
}

/// One online run; returns the second half's scores and the run's figures (its AUC filled in
/// by the caller).
async fn online_run(
    ds: &Dataset,
    rate: f64,
    history_rate: f64,
    args: &OnlineArgs,
    settings: &Settings,
) -> anyhow::Result<(Vec<f32>, OnlineRun)> {
    let dir = tempfile::tempdir().context("a temporary data directory")?;
    let mut s = settings.clone();
    s.node.data_dir = dir.path().to_path_buf();
    let window_ms = crate::settings::dev_window_ms(&s, None);
    let cfg = crate::settings::pipeline_config(&s, window_ms, args.delta_ms, 1)?;
    let events = cfg.logs.events.clone();
    let samples = cfg.logs.samples.clone();
    let (pipe, _join) = PipelineHandle::start(cfg).await?;
    let cell = pipe.cells()[0].clone();
    let schema = settings.schema.clone();
    let decoder = SampleDecoder::new(&schema);
    let threads = Threads::new(1)?;

    // Each row's events, in event-time order: the impression, and its labels when they came.
    let mut timeline: Vec<(i64, usize, bool)> = Vec::with_capacity(ds.rows.len() * 2);
    for (i, r) in ds.rows.iter().enumerate() {
        timeline.push((r.time_ms, i, false));
        if r.sample.labels.values().any(|&v| v > 0.5) {
            timeline.push((r.label_ms, i, true));
        }
    }
    timeline.sort_by_key(|&(t, i, label)| (t, i, label));
    let first_eval = timeline
        .iter()
        .position(|&(_, i, label)| !label && i >= ds.split)
        .unwrap_or(timeline.len());

    let parts = events.partitions();
    let encode = |i: usize, label: bool| -> Vec<(u32, Vec<u8>)> {
        let r = &ds.rows[i];
        let request_id = format!("r{i}");
        let part = partition_of(&request_id, parts);
        if label {
            r.sample
                .labels
                .iter()
                .filter(|(_, &v)| v > 0.5)
                .map(|(kind, _)| {
                    let e = Event::Action(Action {
                        request_id: request_id.clone(),
                        item: r.item.clone(),
                        time_ms: r.label_ms,
                        kind: kind.clone(),
                        value: None,
                        traceparent: None,
                    });
                    (part, e.to_msgpack())
                })
                .collect()
        } else {
            let features = Features {
                dense: r.sample.dense.clone(),
                sparse: r.sample.sparse.clone(),
            };
            let e = Event::Impression(Impression {
                request_id,
                time_ms: r.time_ms,
                user: r.user.clone(),
                item: r.item.clone(),
                features: Snapshot::encode(&features),
                traceparent: None,
            });
            vec![(part, e.to_msgpack())]
        }
    };
    let append = |batch: &mut Vec<(u32, Vec<u8>)>| -> anyhow::Result<()> {
        let mut by_part: BTreeMap<u32, Vec<&[u8]>> = BTreeMap::new();
        for (p, b) in batch.iter() {
            by_part.entry(*p).or_default().push(b);
        }
        for (p, recs) in by_part {
            events.append(p, &recs).context("appending events")?;
        }
        batch.clear();
        Ok(())
    };

    // Per sample partition: (when, high watermark) each time it grew, from the start, so that
    // the lag of a sample appended before the measured half is timed from its append too.
    let mut grew: Vec<Vec<(i64, u64)>> = vec![Vec::new(); samples.partitions() as usize];
    let observe = |grew: &mut Vec<Vec<(i64, u64)>>| -> anyhow::Result<(i64, Vec<u64>)> {
        let now = now_ms();
        let held = highs(&*samples)?;
        for (p, &h) in held.iter().enumerate() {
            if grew[p].last().is_none_or(|&(_, last)| h > last) {
                grew[p].push((now, h));
            }
        }
        Ok((now, held))
    };

    // The history, paced at the fastest rate.
    let mut batch = Vec::new();
    let t0 = Instant::now();
    let mut sent = 0usize;
    while sent < first_eval {
        let due = ((t0.elapsed().as_secs_f64() * history_rate) as usize).min(first_eval);
        for &(_, i, label) in timeline.get(sent..due).unwrap_or_default() {
            batch.extend(encode(i, label));
        }
        sent = sent.max(due);
        append(&mut batch)?;
        observe(&mut grew)?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Serving holds every sample of the history before the measured half starts, unless the
    // node cannot get there in a minute (then the measured half starts behind, as it would).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, held) = observe(&mut grew)?;
        let caught_up = cell.current().is_some_and(|m| {
            let o = &m.manifest().sample_offsets;
            held.iter()
                .enumerate()
                .all(|(p, &h)| o.get(&(p as u32)).copied().unwrap_or(0) >= h)
        });
        if caught_up || Instant::now() >= deadline {
            if !caught_up {
                super::progress("  serving had not caught up with the history after 60 s");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The measured half: score each impression with the served version, then append it.
    let mut scores = vec![0.5f32; ds.rows.len() - ds.split];
    let mut lag_samples = Vec::with_capacity(scores.len());
    let mut lag_ms = Vec::with_capacity(scores.len());
    let mut unserved = 0usize;
    let mut versions = std::collections::BTreeSet::new();
    let t0 = Instant::now();
    let mut done = first_eval;
    let mut to_score: Vec<usize> = Vec::new();
    while done < timeline.len() {
        let due = (first_eval + (t0.elapsed().as_secs_f64() * rate) as usize).min(timeline.len());
        if due <= done {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let (now, held) = observe(&mut grew)?;
        let model = cell.current();
        to_score.clear();
        for &(_, i, label) in &timeline[done..due] {
            if !label && i >= ds.split {
                to_score.push(i);
            }
        }
        if !to_score.is_empty() {
            match &model {
                Some(m) => {
                    versions.insert(m.version());
                    let mut block = SampleBlock::for_schema(&schema);
                    for &i in &to_score {
                        decoder
                            .push(&ds.rows[i].sample, &mut block)
                            .map_err(|e| anyhow::anyhow!("a checked sample: {e}"))?;
                    }
                    let p = m
                        .score_block(&block, &threads)
                        .map_err(|e| anyhow::anyhow!("serving: {e}"))?;
                    for (&i, p) in to_score.iter().zip(p) {
                        scores[i - ds.split] = p;
                    }
                    let o = &m.manifest().sample_offsets;
                    let (mut behind, mut oldest) = (0u64, None::<i64>);
                    for (p, &h) in held.iter().enumerate() {
                        let c = o.get(&(p as u32)).copied().unwrap_or(0);
                        if h > c {
                            behind += h - c;
                            // When the first sample the version lacks was appended.
                            let at = grew[p].partition_point(|&(_, high)| high <= c);
                            let t = grew[p].get(at).map_or(now, |&(t, _)| t);
                            oldest = Some(oldest.map_or(t, |o: i64| o.min(t)));
                        }
                    }
                    let ms = oldest.map_or(0.0, |t| (now - t).max(0) as f64);
                    for _ in &to_score {
                        lag_samples.push(behind);
                        lag_ms.push(ms);
                    }
                }
                None => unserved += to_score.len(),
            }
        }
        for &(_, i, label) in &timeline[done..due] {
            batch.extend(encode(i, label));
        }
        append(&mut batch)?;
        done = due;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let trained = pipe
        .trainer_status()
        .await
        .map(|t| t.samples_per_sec)
        .unwrap_or(0.0);
    let withdrawn = pipe
        .validator_status()
        .await
        .map(|v| v.withdrawn)
        .unwrap_or(0);
    pipe.shutdown().await?;
    lag_samples.sort_unstable();
    lag_ms.sort_by(f64::total_cmp);
    let (q, qf) = (super::quantile::<u64>, super::quantile::<f64>);
    Ok((
        scores,
        OnlineRun {
            rate_asked: rate,
            events_per_sec: (timeline.len() - first_eval) as f64 / elapsed.max(1e-9),
            auc: None,
            beats_daily_by: None,
            behind_zero_lag_by: None,
            lag_samples_p50: q(&lag_samples, 0.5).unwrap_or(0),
            lag_samples_p99: q(&lag_samples, 0.99).unwrap_or(0),
            lag_ms_p50: qf(&lag_ms, 0.5).unwrap_or(0.0),
            lag_ms_p99: qf(&lag_ms, 0.99).unwrap_or(0.0),
            lag_ms_max: lag_ms.last().copied().unwrap_or(0.0),
            unserved_predictions: unserved,
            versions_served: versions.len(),
            versions_withdrawn: withdrawn,
            samples_per_sec_trained: trained,
        },
    ))
}

fn highs(log: &dyn StreamLog) -> anyhow::Result<Vec<u64>> {
    (0..log.partitions())
        .map(|p| log.high_watermark(p).context("reading the sample log"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: i64) -> Row {
        Row {
            time_ms: t,
            label_ms: t,
            user: "-".into(),
            item: "i".into(),
            sample: RawSample::default(),
        }
    }

    #[test]
    fn the_split_is_the_period_boundary_nearest_the_middle() {
        let day = 86_400_000;
        // Three days: 10, 50 and 40 rows. The middle row (50th) is in day 1; the boundary
        // before it leaves 10 rows of history, the one after it 60: the first is nearer.
        let rows: Vec<Row> = (0..10)
            .map(|_| row(5))
            .chain((0..50).map(|_| row(day + 5)))
            .chain((0..40).map(|_| row(2 * day + 5)))
            .collect();
        assert_eq!(split_at_period(&rows, day), 60);
        // Within one period, the halves are halves.
        let one: Vec<Row> = (0..10).map(row).collect();
        assert_eq!(split_at_period(&one, day), 5);
    }

    #[test]
    fn a_malformed_line_is_refused_and_counted_and_the_rest_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let mut text = String::new();
        for i in 0..120 {
            let click = i % 7 == 0;
            text.push_str(&format!(
                "{{\"time_ms\":{},\"labels\":{{\"click\":{}}},\"sparse\":{{\"C1\":\"u{}\"}}}}\n",
                1_000 * (120 - i),
                u8::from(click),
                i % 5
            ));
        }
        text.push_str("{\"time_ms\": \"soon\"}\n{not json\n");
        text.push_str("{\"time_ms\":1,\"label_delay_ms\":-5,\"labels\":{\"click\":1}}\n");
        std::fs::write(&path, text).unwrap();
        let mut schema = Schema::criteo(4);
        schema.dense.clear();
        schema.fields.retain(|f| f.name == "C1");
        let ds = load_jsonl(&path, None, &schema, 86_400_000).unwrap();
        assert_eq!(ds.rejected, 3);
        assert_eq!(ds.rows.len(), 120);
        assert!(ds.reordered);
        assert!(ds.rows.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
        assert_eq!(ds.split, 60);
        assert_eq!(ds.labels.len(), 120);
    }
}
