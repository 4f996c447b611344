//! `freshet dev`: the whole pipeline on one node, under one supervisor, behind the HTTP API.
//!
//! The embedded log and the model store live under the data directory. The simulator plays a
//! live application into the event log unless `--no-simulate` is given (then events come
//! through `POST /v1/events`). A one-line status goes to stderr every few seconds. Ctrl-C (or
//! SIGTERM) finishes the batch in progress, writes a last version and closes the logs; starting
//! again on the same data directory resumes where it stopped.
//!
//! When actors fail faster than `[supervisor]` allows, the supervisor gives up and the node
//! stops training for good. It keeps answering predictions from the last version served, while
//! `/healthz` and `POST /v1/events` answer 503 with the reason (no event is accepted that
//! nothing would train), until Ctrl-C; it then exits with that reason.
//!
//! Endpoints besides the serving ones (`src/http/serving.rs`), from `src/http/node.rs`:
//! - `POST /v1/events`: JSON lines (or one JSON object) of impressions and actions, appended to
//!   the event log; refused lines are dead-lettered to `ingest-rejects` and reported.
//! - `GET /v1/admin/status`, `POST /v1/admin/rollback`, `POST /v1/admin/replay`,
//!   `POST /v1/admin/calibrate`: the supervisor's commands (`freshet ctl` calls them). They
//!   need `Authorization: Bearer <token>` when `--admin-token` is given; `freshet dev` is a
//!   development node, so by default they are open, and it listens on loopback. Beyond
//!   loopback it refuses to start without a token, unless `--insecure-admin`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use anyhow::Context;
use clap::Args;
use freshet_actors::event::INGEST_REJECTS_TOPIC;
use freshet_actors::online::pipeline::PipelineHandle;
use freshet_actors::simulate::{play_live, resume_clock, SimConfig, Simulator};
use freshet_actors::stream::{open_topic, StreamLog};
use freshet_cluster::node::{ClusterNode, ClusterPlacer, NodeConfig};

use crate::http::node::NodeState;
use crate::http::{bind, Counters, HttpArgs, ServingState};
use crate::settings::Settings;

/// How old the newest event of the log may be for a restarted simulator to continue it (see
/// [`resume_clock`]): a minute of backlog plays in seconds; a longer stop starts the clock now.
const SIM_RESUME_MAX_GAP_MS: i64 = 60_000;

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    #[command(flatten)]
    pub(crate) http: HttpArgs,
    /// Do not run the simulator: events come only through POST /v1/events.
    #[arg(long)]
    no_simulate: bool,
    /// Simulated impressions per second.
    #[arg(long, default_value_t = 1000.0)]
    sim_rate: f64,
    /// Simulator seed (default: --seed or train.seed, else from the clock, so that a restart
    /// does not repeat request ids).
    #[arg(long)]
    sim_seed: Option<u64>,
    /// Seeds everything random in the run: the dense initialisation, every embedding table
    /// without a seed of its own, and the simulator (default: train.seed). A run started
    /// twice from an empty data directory with the same seed and `--sim-rate` sees the same
    /// events and starts from the same model.
    #[arg(long)]
    seed: Option<u64>,
    /// How long after an impression a click still labels it [default:
    /// joiner.window.window_ms when configured, else 5000: shorter than a production window,
    /// so negatives arrive while you watch].
    #[arg(long)]
    window_ms: Option<u64>,
    /// A version (delta) every this many milliseconds, unless checkpoint.every_secs is set.
    #[arg(long, default_value_t = 250)]
    delta_ms: u64,
    /// Serving replicas.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Require this bearer token on the admin endpoints. Needed to listen on an address other
    /// than loopback, unless --insecure-admin.
    #[arg(long, env = "FRESHET_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Listen beyond loopback with the admin API (rollback, replay, calibrate) open to anyone
    /// who can reach the port, and no token. A warning says so at every start.
    #[arg(long)]
    insecure_admin: bool,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 5)]
    status_every: u64,
}

/// `freshet dev`, or with `cluster` the coordinator of `freshet node --roles trainer,...`: the
/// same pipeline with its shard owners on the cluster's shard nodes.
pub(crate) fn run(
    args: DevArgs,
    settings: &Settings,
    cluster: Option<NodeConfig>,
) -> anyhow::Result<()> {
    let settings = &settings.seeded(args.seed);
    args.http.check()?;
    anyhow::ensure!(args.replicas >= 1, "--replicas must be at least 1");
    anyhow::ensure!(
        crate::settings::dev_window_ms(settings, args.window_ms) >= 1,
        "--window-ms must be at least 1"
    );
    anyhow::ensure!(
        args.sim_rate > 0.0 && args.sim_rate.is_finite(),
        "--sim-rate must be a positive number"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(dev(args, settings, cluster))
}

async fn dev(
    args: DevArgs,
    settings: &Settings,
    cluster: Option<NodeConfig>,
) -> anyhow::Result<()> {
    let window_ms = crate::settings::dev_window_ms(settings, args.window_ms);
    let doing = match cluster {
        Some(_) => "running a trainer node",
        None => "running freshet dev",
    };
    let _lock = crate::lock::DataDirLock::acquire(&settings.node.data_dir, doing)?;
    // Before anything a caller could wait on (a version, the ready line): a SIGINT from then on
    // stops the node cleanly, however early it comes.
    let stop = crate::stop::StopSignals::install()?;
    // Before the pipeline starts: a taken address must stop the node before it writes a version.
    check_admin_exposure(&args)?;
    let listeners = crate::http::listen(&args.http)?;
    let bases_dir = match &settings.node.bases_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().context("reading the working directory")?,
    };
    let bases_dir = std::fs::canonicalize(&bases_dir)
        .with_context(|| format!("resolving node.bases_dir {}", bases_dir.display()))?;
    let mut cfg =
        crate::settings::pipeline_config(settings, window_ms, args.delta_ms, args.replicas)?;
    let cluster = match cluster {
        Some(c) => {
            let node = crate::cluster::start(&c).await?;
            crate::cluster::announce(&node, &c);
            // Each start places the shards anew, one epoch after the newest version's.
            let store = cfg.store.clone();
            let last = tokio::task::spawn_blocking(move || newest_placement_epoch(&store))
                .await
                .context("reading the store")??;
            let placer = ClusterPlacer::new(node.clone(), last.map_or(1, |e| e + 1));
            cfg.placer = Some(Arc::new(placer.clone()));
            Some((node, placer))
        }
        None => None,
    };
    // Whatever ends the node, it releases its shards and leaves its cluster.
    let ran = run_node(
        args,
        settings,
        cfg,
        listeners,
        bases_dir,
        cluster.as_ref(),
        stop,
    )
    .await;
    leave(cluster.as_ref()).await;
    ran
}

/// The epoch of the newest version's shard placement, if it records one.
fn newest_placement_epoch(store: &freshet_actors::ckpt::ModelStore) -> anyhow::Result<Option<u64>> {
    let Some(v) = store.latest()? else {
        return Ok(None);
    };
    Ok(store.manifest(v)?.placement.map(|p| p.epoch))
}

/// The pipeline behind the HTTP API, until Ctrl-C, SIGTERM or a failure.
async fn run_node(
    args: DevArgs,
    settings: &Settings,
    cfg: freshet_actors::online::pipeline::PipelineConfig,
    listeners: crate::http::Listeners,
    bases_dir: std::path::PathBuf,
    cluster: Option<&(ClusterNode, ClusterPlacer)>,
    mut stop: crate::stop::StopSignals,
) -> anyhow::Result<()> {
    let window_ms = crate::settings::dev_window_ms(settings, args.window_ms);
    let events = cfg.logs.events.clone();
    let samples = cfg.logs.samples.clone();
    // Before the pipeline starts: a node lost while it starts is failed over once it runs.
    let cluster_events = cluster.map(|(node, _)| node.subscribe());
    let (pipe, sup_join) = PipelineHandle::start(cfg)
        .await
        .context("starting the node")?;
    // Serving nodes follow what this node's replicas are sent, from the first publication on.
    if let Some((node, _)) = cluster {
        let n = node.clone();
        pipe.replicas()
            .follow(Arc::new(move |v, trace| n.published(v, trace)));
        let serving = pipe.replicas().serving().map(|m| m.version());
        node.offer_models(pipe.store().clone(), serving);
    }
    // What the trainer restored: the newest live version, or an older one when that one
    // failed verification and was set aside.
    let store = pipe.store().clone();
    let quarantined = tokio::task::spawn_blocking(move || store.quarantined()).await??;
    if let Some(q) = quarantined.last() {
        eprintln!(
            "{} version(s) set aside in {}; the newest, version {}: {}",
            quarantined.len(),
            q.dir.parent().unwrap_or(&q.dir).display(),
            q.version,
            q.reason
        );
    }
    match pipe.status().await?.trainer.and_then(|t| t.started_from) {
        Some(v) => eprintln!("resuming from version {v}"),
        None => eprintln!("starting a fresh model"),
    }
    // The cluster's losses and joins move the shards.
    let placements = cluster.map(|(node, placer)| {
        Arc::new(crate::failover::Placements::new(
            node.clone(),
            placer.clone(),
            pipe.clone(),
        ))
    });
    let failover = match (placements.clone(), cluster_events) {
        (Some(p), Some(events)) => Some(p.spawn(events)),
        _ => None,
    };
    let root = settings.log_dir();
    let ingest_rejects = open_topic(&root, INGEST_REJECTS_TOPIC, &settings.log)
        .with_context(|| format!("opening topic {INGEST_REJECTS_TOPIC}"))?;

    // The simulator, on its own thread: it paces itself by the wall clock.
    let stop_sim = Arc::new(AtomicBool::new(false));
    let sim = if args.no_simulate {
        None
    } else {
        let now = freshet_actors::stream::now_ms();
        let (start_ms, resumed) =
            resume_clock(&*events, now, SIM_RESUME_MAX_GAP_MS).context("reading the event log")?;
        let seed = args.sim_seed.or(settings.train.seed).unwrap_or(now as u64);
        // A simulator that continues a log draws requests of its own (their ids name the
        // seed), not the ones the joiner has seen and would drop as duplicates.
        let seed = if resumed {
            seed ^ start_ms as u64
        } else {
            seed
        };
        if resumed {
            eprintln!(
                "the simulator continues the event log from {:.1} s ago",
                (now - start_ms) as f64 / 1e3
            );
        }
        let mut sim = Simulator::new(SimConfig {
            seed,
            rate: args.sim_rate,
            start_ms,
            click_delay_median_ms: (window_ms as f64 / 5.0).min(5000.0),
            click_delay_sigma: 0.7,
            ..SimConfig::default()
        })?;
        let (log, stop) = (events.clone(), stop_sim.clone());
        Some(std::thread::spawn(move || {
            play_live(&mut sim, &*log, &stop)
        }))
    };

    let cell = pipe.cells()[0].clone();
    let replicas = pipe.replicas().clone();
    let node = Arc::new(NodeState {
        pipe: pipe.clone(),
        ingest_rejects,
        token: args.admin_token.clone(),
        bases_dir,
        events_accepted: AtomicU64::new(0),
        events_rejected: AtomicU64::new(0),
        cluster: cluster.map(|(n, _)| n.clone()),
        placements,
    });
    let state = web::Data::new(ServingState {
        store: pipe.store().clone(),
        cell,
        replicas,
        max_candidates: args.http.max_candidates,
        max_in_flight: args.http.max_in_flight,
        scoring: tokio::sync::Semaphore::new(args.http.scoring_threads()),
        counters: Counters::default(),
        metrics: vec![node.clone()],
        stopped: pipe.gave_up_slot(),
        following: None,
    });
    let node_data = web::Data::from(node.clone());
    let servers = bind(
        state.clone(),
        &args.http,
        &settings.http,
        listeners,
        move |cfg, port| {
            cfg.app_data(node_data.clone());
            crate::http::node::routes(cfg, port);
        },
    )?;
    servers.announce(true);
    for a in &servers.addrs {
        eprintln!("  predict: POST http://{a}/v1/predict   models: GET http://{a}/v1/models");
        eprintln!("  events:  POST http://{a}/v1/events    metrics: GET http://{a}/metrics");
    }
    if let Some(a) = servers.ops_addrs.first().or(servers.addrs.first()) {
        eprintln!("  admin:   freshet ctl --url http://{a} status");
    }
    let http = servers.spawn();

    // The status line, until Ctrl-C or the supervisor gives up.
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_secs(args.status_every.max(1));
    let mut last = (Instant::now(), total(&*events), total(&*samples));
    let mut sup_join = Some(sup_join);
    // One listener since the start: a signal that came while another branch ran (the status
    // line awaits the actors), or while the node started, is taken on the next turn.
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = stop.recv() => match pipe.gave_up() {
                None => break Ok(()),
                Some(why) => break Err(anyhow::anyhow!("the node stopped training for good: {why}")),
            },
            r = async { sup_join.as_mut().expect("polled only while some").await }, if sup_join.is_some() => {
                sup_join = None;
                stop_sim.store(true, Ordering::SeqCst);
                let why = pipe.gave_up().map_or_else(|| format!("its supervisor stopped ({r:?})"), str::to_owned);
                // Predictions go on from the last version served; /healthz and /v1/events
                // say why training stopped until the operator stops the node.
                if tty {
                    eprintln!();
                }
                eprintln!("the node stopped training for good: {why}");
                eprintln!("  serving goes on from the last version; /healthz and /v1/events answer 503; Ctrl-C to exit");
            }
            _ = tokio::time::sleep(every) => {
                let now = (Instant::now(), total(&*events), total(&*samples));
                let secs = now.0.duration_since(last.0).as_secs_f64();
                let line = status_line(&state, &node, (now.1 - last.1) as f64 / secs, (now.2 - last.2) as f64 / secs).await;
                last = now;
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else {
                    eprintln!("{line}");
                }
            }
        }
    };
    if tty {
        eprintln!();
    }
    eprintln!("shutting down: finishing the batch and writing a last version");
    // No failover restarts what the shutdown stops.
    if let Some(f) = &failover {
        f.abort();
    }
    stop_sim.store(true, Ordering::SeqCst);
    if let Some(t) = sim {
        match t.join() {
            Ok(Ok(n)) => eprintln!("the simulator appended {n} events"),
            Ok(Err(e)) => eprintln!("the simulator stopped: {e}"),
            Err(_) => eprintln!("the simulator thread panicked"),
        }
    }
    if let Err(e) = http.stop().await {
        tracing::warn!(error = %format!("{e:#}"), "stopping the HTTP servers");
    }
    if let Err(e) = outcome {
        // Nothing trains to finish a version; the logs still flush.
        if let Err(f) = pipe.shutdown().await {
            tracing::warn!(error = %format!("{f:#}"), "shutting down a node that stopped training");
        }
        return Err(e);
    }
    let last = pipe.shutdown().await?;
    println!(
        "{}",
        serde_json::json!({"last_version": last, "events": total(&*events), "samples": total(&*samples)})
    );
    Ok(())
}

/// Stops the owners this node placed and tells the cluster it leaves.
async fn leave(cluster: Option<&(ClusterNode, ClusterPlacer)>) {
    let Some((node, placer)) = cluster else {
        return;
    };
    if let Err(e) = placer.release().await {
        tracing::warn!(error = %format!("{e:#}"), "releasing the shard owners");
    }
    node.leave().await;
}

/// Refuses an address beyond loopback while the admin API needs no token, unless
/// `--insecure-admin`, and then warns. Decided on the resolved addresses, before binding, so a
/// refused node never listens at all.
fn check_admin_exposure(args: &DevArgs) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    if args.admin_token.is_some() {
        return Ok(());
    }
    let mut addrs: Vec<std::net::SocketAddr> = args
        .http
        .listen
        .to_socket_addrs()
        .with_context(|| format!("resolving --listen {}", args.http.listen))?
        .collect();
    if let Some(ops) = args.http.ops_addr()? {
        addrs.extend(
            ops.to_socket_addrs()
                .with_context(|| format!("resolving the operations port {ops}"))?,
        );
    }
    let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback()) else {
        return Ok(());
    };
    if !args.insecure_admin {
        anyhow::bail!(
            "refusing to listen on {open} with an open admin API: anyone who reaches it could \
             roll back, replay or calibrate the node. Give a token (--admin-token or \
             FRESHET_ADMIN_TOKEN), listen on loopback, or pass --insecure-admin"
        );
    }
    eprintln!(
        "WARNING: the admin API on {open} needs no token (--insecure-admin): anyone who can \
         reach this port can roll back, replay or calibrate the node"
    );
    tracing::warn!(address = %open, "the admin API is open to the network (--insecure-admin)");
    Ok(())
}

fn total(log: &dyn StreamLog) -> u64 {
    (0..log.partitions())
        .map(|p| log.high_watermark(p).unwrap_or(0))
        .sum()
}

async fn status_line(
    s: &ServingState,
    n: &NodeState,
    events_per_s: f64,
    samples_per_s: f64,
) -> String {
    let serving = s.cell.current();
    let freshness = serving.as_ref().map(|m| {
        let age_ms =
            (freshet_actors::stream::now_ms() as u64).saturating_sub(m.manifest().created_unix_ms);
        format!("{:.1}s", age_ms as f64 / 1000.0)
    });
    let (auc, alert) = match n.pipe.validator_status().await {
        Ok(v) => (
            v.serving_window
                .and_then(|w| w.auc)
                .map(|a| format!("{a:.4}")),
            v.alert,
        ),
        Err(_) => (None, false),
    };
    if let Some(why) = n.pipe.gave_up() {
        return format!(
            "TRAINING STOPPED ({why}); serving v{}",
            serving.map_or("-".into(), |m| m.version().to_string())
        );
    }
    let trained = n.pipe.trainer_status().await.ok();
    format!(
        "events {events_per_s:.0}/s, samples {samples_per_s:.0}/s, trained {}/s, serving v{}, \
         age {}, validation auc {}{}",
        trained.map_or("-".into(), |t| format!("{:.0}", t.samples_per_sec)),
        serving.map_or("-".into(), |m| m.version().to_string()),
        freshness.unwrap_or_else(|| "-".into()),
        auc.unwrap_or_else(|| "-".into()),
        if alert { " [VALIDATION ALERT]" } else { "" }
    )
}
