//! `freshet train` and `freshet gen`: their arguments, and the report `train` prints. The
//! offline driver itself is `freshet_actors::training::offline`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use freshet_actors::dense::ModelKind;
use freshet_actors::metrics::auc;
use freshet_actors::sample::Format;
use freshet_actors::training::offline::{self, OfflineJob, OfflineOut, OfflineStart};

use crate::progress::Progress;
use freshet_actors::training::FreshModel;

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
    /// Without --test, the last --holdout of each partition (default 10%) is held out for the
    /// test metrics (and left to online training). With the embedded log, the node must be stopped.
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
    /// Test data. Without it the last --holdout of the rows are held out.
    #[arg(long, value_delimiter = ',', value_name = "FILE")]
    test: Vec<PathBuf>,
    /// Without --test: the share of the rows (with --from-log, of each partition) held out as
    /// the test set, in 0..1 [default: 0.1; with --init and --data, 0, so that an incremental
    /// daily job trains on the whole day].
    #[arg(long, value_name = "SHARE", conflicts_with = "test")]
    holdout: Option<f64>,
    /// Write one click probability per test row, in order, to FILE after the last epoch: an
    /// offline evaluation needs no server.
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
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
    /// Seeds everything random in the run: the dense initialisation and every embedding
    /// table without a seed of its own (default: train.seed, else model.seed and the tables'
    /// own seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Make room for about N rows in each table the model reads, spread over the shards,
    /// before training starts: index, row metadata and rows are allocated and faulted in up
    /// front (see `embedding.tables.<t>.reserve_rows`, which this overrides), so the steps do
    /// not pay for fresh memory as the tables fill. Tables still grow past N.
    #[arg(long, value_name = "N")]
    reserve_rows: Option<u64>,
    /// With --join, the shard owners run on the cluster's nodes with the shards role, placed
    /// by rendezvous hashing over their ids, instead of in this process; the model is the
    /// same either way. This process joins as a node with the trainer role (its cluster port
    /// on an unused port of 127.0.0.1 unless --cluster-listen).
    #[command(flatten)]
    cluster: crate::cluster::ClusterArgs,
}

pub(crate) fn run(args: TrainArgs, settings: &Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    offline::check_args(
        args.batch.unwrap_or(settings.train.batch),
        args.epochs,
        args.from_log,
        holdout(&args),
    )?;
    // Opening the embedded log recovers it: never while a node appends to it.
    let _lock = match args.from_log {
        true => {
            crate::lock::DataDirLock::for_embedded_log(settings, "training from its sample log")?
        }
        false => None,
    };
    let cluster = match args.cluster.join.is_empty() {
        true => None,
        false => {
            let mut flags = args.cluster.clone();
            flags
                .cluster_listen
                .get_or_insert_with(|| "127.0.0.1:0".into());
            let name = format!("train-{}", std::process::id());
            Some(crate::cluster::node_config(
                settings,
                &flags,
                Some("trainer"),
                Some(name),
            )?)
        }
    };
    let mut job = job(args, settings)?;
    let report = rt.block_on(async {
        let Some(cfg) = cluster else {
            return offline::run(job, &mut Progress::new("rows")).await;
        };
        let node = crate::cluster::start(&cfg).await?;
        let placer = freshet_cluster::node::ClusterPlacer::new(node.clone(), 1);
        job.placer = Some(Arc::new(placer.clone()));
        let report = offline::run(job, &mut Progress::new("rows")).await;
        if let Err(e) = placer.release().await {
            tracing::warn!(error = %crate::describe(&e), "the shard nodes keep this job's owners");
        }
        node.leave().await;
        report
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The share of the rows held out without --test: --holdout, else none for an incremental job
/// on files (--init and --data), else 10%.
fn holdout(args: &TrainArgs) -> f64 {
    args.holdout
        .unwrap_or(if args.init.is_some() && !args.from_log {
            0.0
        } else {
            0.1
        })
}

/// The offline job the arguments and the configuration describe.
fn job(args: TrainArgs, settings: &Settings) -> anyhow::Result<OfflineJob> {
    let settings = &settings.seeded(args.seed);
    let start = match &args.init {
        Some(store) => OfflineStart::Init {
            store: store.clone(),
            version: args.init_version,
            model: args.model,
        },
        None => {
            let mut model = settings.model.clone();
            if let Some(k) = args.model {
                model.kind = k;
            }
            let schema = settings.schema.clone();
            let tables = settings
                .model_tables(&schema, &model)?
                .into_iter()
                .collect();
            OfflineStart::Fresh(FreshModel {
                schema,
                model,
                tables,
            })
        }
    };
    let log = if args.from_log {
        let topics = freshet_actors::topics::open_topics(&settings.log_dir(), &settings.log)?;
        Some(Arc::clone(&topics.samples))
    } else {
        None
    };
    let holdout = holdout(&args);
    let out = args.out.map(|store| {
        let mut schedule = settings.checkpoint.schedule();
        if let Some(n) = args.ckpt_every_steps {
            schedule.every_steps = (n > 0).then_some(n);
        }
        OfflineOut { store, schedule }
    });
    Ok(OfflineJob {
        start,
        data: args.data,
        format: args.format,
        holdout,
        predictions: args.predictions,
        test: args.test,
        log,
        epochs: args.epochs,
        batch: args.batch.unwrap_or(settings.train.batch),
        threads: args.threads.unwrap_or(settings.train.threads),
        shards: settings.embedding.shards,
        reserve_rows: args.reserve_rows,
        max_rows: args.max_rows,
        rejects: args
            .rejects
            .unwrap_or_else(|| settings.node.data_dir.join("rejects.tsv")),
        spill_dir: settings.spill_dir(),
        out,
        placer: None,
    })
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
    let mut progress = Progress::new("rows");
    let start = std::time::Instant::now();
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
        progress.update(i + 1, Some(args.rows), &|| {
            format!("writing {}", args.out.display())
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
