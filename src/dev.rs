//! `freshet dev`: the whole pipeline on one node, under one supervisor, behind the HTTP API.
//!
//! The embedded log and the model store live under the data directory. The simulator plays a
//! live application into the event log unless `--no-simulate` is given (then events come
//! through `POST /v1/events`). A one-line status goes to stderr every few seconds. Ctrl-C
//! finishes the batch in progress, writes a last version and closes the logs; starting again
//! on the same data directory resumes where it stopped.
//!
//! Endpoints besides the serving ones (`src/serve.rs`):
//! - `POST /v1/events`: JSON lines (or one JSON object) of impressions and actions, appended to
//!   the event log; refused lines are dead-lettered to `ingest-rejects` and reported.
//! - `GET /v1/admin/status`, `POST /v1/admin/rollback`, `POST /v1/admin/replay`,
//!   `POST /v1/admin/calibrate`: the supervisor's commands (`freshet ctl` calls them). They
//!   need `Authorization: Bearer <token>` when `--admin-token` is given; `freshet dev` is a
//!   development node, so by default they are open (and it listens on loopback).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use anyhow::Context;
use clap::Args;
use freshet_actors::ckpt::ModelStore;
use freshet_actors::event::{INGEST_REJECTS_TOPIC, SAMPLE_REJECTS_TOPIC};
use freshet_actors::intake::{admit, Intake};
use freshet_actors::online::pipeline::{CommandError, Logs, PipelineConfig, PipelineHandle};
use freshet_actors::simulate::{play_live, SimConfig, Simulator};
use freshet_actors::stream::{open_topic, StreamLog};
use freshet_actors::supervisor::Intensity;
use freshet_actors::training::feed::ReplayPlan;
use freshet_actors::training::FreshModel;
use serde::{Deserialize, Serialize};

use crate::serve::{error, Counters, Serve};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    #[command(flatten)]
    http: crate::serve::HttpArgs,
    /// Do not run the simulator: events come only through POST /v1/events.
    #[arg(long)]
    no_simulate: bool,
    /// Simulated impressions per second.
    #[arg(long, default_value_t = 1000.0)]
    sim_rate: f64,
    /// Simulator seed (default: from the clock, so a restart does not repeat request ids).
    #[arg(long)]
    sim_seed: Option<u64>,
    /// How long after an impression a click still labels it. Shorter than a production
    /// window (joiner.window.window_ms) so negatives arrive while you watch.
    #[arg(long, default_value_t = 5000)]
    window_ms: u64,
    /// A version (delta) every this many milliseconds, unless checkpoint.every_secs is set.
    #[arg(long, default_value_t = 1000)]
    delta_ms: u64,
    /// Serving replicas.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Require this bearer token on the admin endpoints.
    #[arg(long, env = "FRESHET_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 5)]
    status_every: u64,
}

/// The node behind the HTTP API.
#[derive(Debug)]
pub(crate) struct Node {
    pipe: PipelineHandle,
    ingest_rejects: Arc<dyn StreamLog>,
    token: Option<String>,
    events_accepted: AtomicU64,
    events_rejected: AtomicU64,
}

pub(crate) fn run(args: DevArgs, settings: &Settings) -> anyhow::Result<()> {
    args.http.check()?;
    anyhow::ensure!(args.replicas >= 1, "--replicas must be at least 1");
    anyhow::ensure!(args.window_ms >= 1, "--window-ms must be at least 1");
    anyhow::ensure!(
        args.sim_rate > 0.0 && args.sim_rate.is_finite(),
        "--sim-rate must be a positive number"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(dev(args, settings))
}

/// The node's pipeline from the settings, with `dev`'s join window, version interval and
/// replica count.
pub(crate) fn pipeline_config(
    settings: &Settings,
    window_ms: u64,
    delta_ms: u64,
    replicas: usize,
) -> anyhow::Result<PipelineConfig> {
    let root = settings.log_dir();
    let topics = crate::stream::open_topics(&root, &settings.log)?;
    let sample_rejects = open_topic(&root, SAMPLE_REJECTS_TOPIC, &settings.log)
        .with_context(|| format!("opening topic {SAMPLE_REJECTS_TOPIC}"))?;
    let store_dir = settings.node.data_dir.join("models");
    let store = ModelStore::open(&store_dir)
        .with_context(|| format!("opening the model store {}", store_dir.display()))?;
    let schema = settings.schema.clone();
    let model = settings.model.clone();
    let tables = settings.model_tables(&schema, &model)?;
    let spill = tables
        .values()
        .any(|c| c.dram_budget_bytes.is_some())
        .then(|| settings.spill_dir());
    let mut schedule = settings.checkpoint.schedule();
    if schedule.every.is_none() && schedule.every_steps.is_none() {
        schedule.every = Some(Duration::from_millis(delta_ms.max(1)));
    }
    let mut join = settings.joiner.window.clone();
    join.window_ms = window_ms;
    Ok(PipelineConfig {
        logs: Logs {
            events: topics.events,
            samples: topics.samples,
            dead_letters: topics.dead_letters,
            sample_rejects,
        },
        store,
        joiner_dir: settings.node.data_dir.join("joiner"),
        join,
        joiner_checkpoint: settings.joiner.checkpoint,
        joiner_batch: settings.joiner_batch(),
        fresh: FreshModel {
            schema,
            model,
            tables,
        },
        shards: settings.embedding.shards,
        spill_dir: spill,
        schedule,
        batch: settings.train.batch,
        threads: settings.train.threads,
        gate: settings.validation.clone(),
        replicas,
        intensity: Intensity::default(),
        faults: Default::default(),
    })
}

async fn dev(args: DevArgs, settings: &Settings) -> anyhow::Result<()> {
    let _lock = crate::lock::DataDirLock::acquire(&settings.node.data_dir, "running freshet dev")?;
    let cfg = pipeline_config(settings, args.window_ms, args.delta_ms, args.replicas)?;
    let events = cfg.logs.events.clone();
    let samples = cfg.logs.samples.clone();
    let resumed = cfg.store.latest_live()?;
    let (pipe, sup_join) = PipelineHandle::start(cfg)
        .await
        .context("starting the node")?;
    match resumed {
        Some(v) => eprintln!("resuming from version {v}"),
        None => eprintln!("starting a fresh model"),
    }
    let root = settings.log_dir();
    let ingest_rejects = open_topic(&root, INGEST_REJECTS_TOPIC, &settings.log)
        .with_context(|| format!("opening topic {INGEST_REJECTS_TOPIC}"))?;

    // The simulator, on its own thread: it paces itself by the wall clock.
    let stop_sim = Arc::new(AtomicBool::new(false));
    let sim = if args.no_simulate {
        None
    } else {
        let seed = args
            .sim_seed
            .unwrap_or_else(|| freshet_actors::stream::now_ms() as u64);
        let mut sim = Simulator::new(SimConfig {
            seed,
            rate: args.sim_rate,
            start_ms: freshet_actors::stream::now_ms(),
            click_delay_median_ms: (args.window_ms as f64 / 5.0).min(5000.0),
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
    let state = web::Data::new(Serve {
        store: pipe.store().clone(),
        cell,
        replicas,
        max_candidates: args.http.max_candidates,
        max_in_flight: args.http.max_in_flight,
        counters: Counters::default(),
        node: Some(Node {
            pipe: pipe.clone(),
            ingest_rejects,
            token: args.admin_token.clone(),
            events_accepted: AtomicU64::new(0),
            events_rejected: AtomicU64::new(0),
        }),
    });
    let (server, addrs) = crate::serve::bind(state.clone(), &args.http, routes)?;
    for a in addrs {
        eprintln!("listening on http://{a}");
        eprintln!("  predict: POST http://{a}/v1/predict   models: GET http://{a}/v1/models");
        eprintln!("  events:  POST http://{a}/v1/events    metrics: GET http://{a}/metrics");
        eprintln!("  admin:   freshet ctl --url http://{a} status");
    }
    let http = server.handle();
    let server = tokio::spawn(server);

    // The status line, until Ctrl-C or the supervisor gives up.
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_secs(args.status_every.max(1));
    let mut last = (Instant::now(), total(&*events), total(&*samples));
    let mut sup_join = sup_join;
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            r = &mut sup_join => {
                break Err(anyhow::anyhow!("the node's supervisor stopped ({r:?}): restarts exceeded their limit; see the log above"));
            }
            _ = tokio::time::sleep(every) => {
                let now = (Instant::now(), total(&*events), total(&*samples));
                let secs = now.0.duration_since(last.0).as_secs_f64();
                let line = status_line(&state, (now.1 - last.1) as f64 / secs, (now.2 - last.2) as f64 / secs).await;
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
    stop_sim.store(true, Ordering::SeqCst);
    if let Some(t) = sim {
        match t.join() {
            Ok(Ok(n)) => eprintln!("the simulator appended {n} events"),
            Ok(Err(e)) => eprintln!("the simulator stopped: {e}"),
            Err(_) => eprintln!("the simulator thread panicked"),
        }
    }
    http.stop(true).await;
    let _ = server.await;
    outcome?;
    let last = pipe.shutdown().await?;
    println!(
        "{}",
        serde_json::json!({"last_version": last, "events": total(&*events), "samples": total(&*samples)})
    );
    Ok(())
}

fn total(log: &dyn StreamLog) -> u64 {
    (0..log.partitions())
        .map(|p| log.high_watermark(p).unwrap_or(0))
        .sum()
}

async fn status_line(s: &Serve, events_per_s: f64, samples_per_s: f64) -> String {
    let serving = s.cell.current();
    let freshness = serving.as_ref().map(|m| {
        let age_ms =
            (freshet_actors::stream::now_ms() as u64).saturating_sub(m.manifest().created_unix_ms);
        format!("{:.1}s", age_ms as f64 / 1000.0)
    });
    let (auc, alert) = match &s.node {
        Some(n) => match n.pipe.validator_status().await {
            Ok(v) => (
                v.serving_window
                    .and_then(|w| w.auc)
                    .map(|a| format!("{a:.4}")),
                v.alert,
            ),
            Err(_) => (None, false),
        },
        None => (None, false),
    };
    let trained = match &s.node {
        Some(n) => n.pipe.trainer_status().await.ok(),
        None => None,
    };
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

/// The node's lines of `/metrics`.
pub(crate) async fn write_metrics(node: &Node, out: &mut String) {
    use std::fmt::Write;
    let mut put = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    put(
        "freshet_events_accepted_total",
        "counter",
        "Events appended through POST /v1/events.",
        node.events_accepted.load(Ordering::Relaxed) as f64,
    );
    put(
        "freshet_events_rejected_total",
        "counter",
        "Events refused by POST /v1/events (dead-lettered to ingest-rejects).",
        node.events_rejected.load(Ordering::Relaxed) as f64,
    );
    if let Ok(v) = node.pipe.validator_status().await {
        put(
            "freshet_validation_alert",
            "gauge",
            "1 while consecutive versions fail the validation gate.",
            f64::from(u8::from(v.alert)),
        );
        put(
            "freshet_validation_consecutive_failures",
            "gauge",
            "Versions failed since the last one that passed.",
            f64::from(v.consecutive_failures),
        );
        put(
            "freshet_validation_failed_total",
            "counter",
            "Versions that failed the gate (this validator incarnation).",
            v.failed as f64,
        );
        put(
            "freshet_validation_passed_total",
            "counter",
            "Versions that passed the gate (this validator incarnation).",
            v.passed as f64,
        );
    }
    if let Ok(t) = node.pipe.trainer_status().await {
        put(
            "freshet_trainer_rows_trained",
            "gauge",
            "Samples trained into the model's lineage.",
            t.rows_trained as f64,
        );
        put(
            "freshet_trainer_lag_samples",
            "gauge",
            "Samples in the log the trainer has not consumed.",
            t.lag as f64,
        );
    }
    if let Ok(st) = node.pipe.supervisor_status().await {
        let restarts: u64 = st.iter().map(|c| c.restarts).sum();
        put(
            "freshet_supervisor_restarts_total",
            "counter",
            "Children restarted after a failure.",
            restarts as f64,
        );
    }
}

pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/events", web::post().to(events))
        .route("/v1/admin/status", web::get().to(admin_status))
        .route("/v1/admin/rollback", web::post().to(admin_rollback))
        .route("/v1/admin/replay", web::post().to(admin_replay))
        .route("/v1/admin/calibrate", web::post().to(admin_calibrate));
}

fn node(s: &Serve) -> Result<&Node, Box<HttpResponse>> {
    s.node
        .as_ref()
        .ok_or_else(|| Box::new(error(StatusCode::NOT_FOUND, "this server runs no pipeline")))
}

#[derive(Serialize)]
struct Refused {
    line: usize,
    reason: String,
    error: String,
}

/// `POST /v1/events`: JSON lines of events. Each valid line is appended; each invalid one is
/// dead-lettered and reported with its line number. 200 when any line was accepted or the
/// body held none; 400 when every line was refused.
async fn events(s: web::Data<Serve>, body: web::Bytes) -> HttpResponse {
    let n = match node(&s) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let log = n.pipe.logs().events.clone();
    let rejects = n.ingest_rejects.clone();
    let parts = log.partitions();
    let done = web::block(move || -> Result<(usize, Vec<Refused>), String> {
        let mut pending: Vec<Vec<Vec<u8>>> = vec![Vec::new(); parts as usize];
        let mut refused = Vec::new();
        let mut dead = Vec::new();
        let mut accepted = 0;
        for (i, line) in body.split(|&b| b == b'\n').enumerate() {
            match admit(line, i as u64 + 1, "http:/v1/events", parts) {
                Intake::Blank => {}
                Intake::Event { partition, record } => {
                    accepted += 1;
                    pending[partition as usize].push(record);
                }
                Intake::Refused(r) => {
                    dead.push(r.dead_letter);
                    refused.push(Refused {
                        line: i + 1,
                        reason: r.reason.to_owned(),
                        error: r.error,
                    });
                }
            }
        }
        for (p, recs) in pending.iter().enumerate() {
            if !recs.is_empty() {
                let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
                log.append(p as u32, &refs).map_err(|e| e.to_string())?;
            }
        }
        if !dead.is_empty() {
            let refs: Vec<&[u8]> = dead.iter().map(Vec::as_slice).collect();
            rejects.append(0, &refs).map_err(|e| e.to_string())?;
        }
        Ok((accepted, refused))
    })
    .await;
    match done {
        Ok(Ok((accepted, refused))) => {
            n.events_accepted
                .fetch_add(accepted as u64, Ordering::Relaxed);
            n.events_rejected
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            let status = if accepted == 0 && !refused.is_empty() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            HttpResponse::build(status).json(serde_json::json!({
                "accepted": accepted,
                "rejected": refused.len(),
                "refused": refused,
            }))
        }
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the event log refused the append: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The node if the request may use the admin API, else the answer to give.
fn admin<'a>(s: &'a Serve, req: &HttpRequest) -> Result<&'a Node, Box<HttpResponse>> {
    let n = node(s)?;
    if let Some(token) = &n.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compared in full whatever the prefix that matches, so timing tells nothing.
        let ok = given.is_some_and(|g| {
            g.len() == token.len()
                && g.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if !ok {
            return Err(Box::new(HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                .json(serde_json::json!({"error": "the admin API needs `Authorization: Bearer <token>`"}))));
        }
    }
    Ok(n)
}

fn command_error(e: CommandError) -> HttpResponse {
    let status = match &e {
        CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
        CommandError::NotFound(_) => StatusCode::NOT_FOUND,
        CommandError::Conflict(_) => StatusCode::CONFLICT,
        CommandError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let why = format!("{e:#}");
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %why, "admin command failed");
    }
    error(status, &why)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<HttpResponse>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("bad request body: {e}"),
        ))
    })
}

async fn admin_status(s: web::Data<Serve>, req: HttpRequest) -> HttpResponse {
    let n = match admin(&s, &req) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    match n.pipe.status().await {
        Ok(st) => HttpResponse::Ok().json(st),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
}

async fn admin_rollback(s: web::Data<Serve>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let n = match admin(&s, &req) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let b: RollbackBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match n.pipe.rollback(b.version).await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({
            "rolled_back_to": b.version,
            "serving": s.cell.version(),
        })),
        Err(e) => command_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    #[serde(default)]
    partition: u32,
    from: u64,
    to: u64,
    skip: Option<(u64, u64)>,
}

async fn admin_replay(s: web::Data<Serve>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let n = match admin(&s, &req) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let b: ReplayBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let plan = ReplayPlan {
        partition: b.partition,
        from: b.from,
        to: b.to,
        skip: b.skip,
    };
    match n.pipe.replay(plan.clone()).await {
        Ok(()) => {
            HttpResponse::Ok().json(serde_json::json!({"replaying": plan, "samples": plan.len()}))
        }
        Err(e) => command_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrateBody {
    base: PathBuf,
    version: Option<u64>,
}

async fn admin_calibrate(s: web::Data<Serve>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let n = match admin(&s, &req) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let b: CalibrateBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match n.pipe.calibrate(b.base, b.version).await {
        Ok(v) => HttpResponse::Ok().json(serde_json::json!({"installed_version": v})),
        Err(e) => command_error(e),
    }
}
