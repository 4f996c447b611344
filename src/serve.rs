//! `freshet serve`: a ServingReplica behind the HTTP API, following a model store.
//!
//! The replica actor keeps the model cell at the newest published version; request handlers
//! read the cell directly (never through the actor's mailbox), so an update never queues a
//! prediction. Here the publisher is a store follower: every new version whose validation did
//! not fail is published in order. In a full node the validator publishes instead.
//!
//! Endpoints:
//! - `POST /v1/predict`: a [`PredictRequest`] as JSON, or msgpack with
//!   `Content-Type: application/msgpack`; the answer comes in the same encoding.
//! - `GET /v1/models`: every version in the store, its validation, and which one is served.
//! - `GET /healthz`: 200 once a version is served, 503 before.
//! - `GET /metrics`: Prometheus text.
//!
//! Limits: the body size (413 beyond it), the candidates per request (400), and the requests
//! scored at once (503 beyond it: load is shed instead of queued).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, ContentType};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use anyhow::Context;
use clap::Args;
use freshet_actors::ckpt::ModelStore;
use freshet_actors::dense::Threads;
use freshet_actors::serving::replica::{ReplicaArgs, ReplicaHandle};
use freshet_actors::serving::ReplicaSet;
use freshet_actors::serving::{ModelCell, PredictRequest, ServingError};
use serde::Serialize;

use crate::settings::Settings;

const MSGPACK: &str = "application/msgpack";

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The model store to serve from (default: <data_dir>/models).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(flatten)]
    http: HttpArgs,
    /// How often the store is checked for new versions, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

/// Counters exported on /metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests_ok: AtomicU64,
    requests_bad: AtomicU64,
    requests_shed: AtomicU64,
    requests_failed: AtomicU64,
    items_scored: AtomicU64,
    in_flight: AtomicUsize,
}

/// The HTTP server's address and limits, shared by `freshet serve` and `freshet dev`.
#[derive(Debug, Args)]
pub(crate) struct HttpArgs {
    /// Address to listen on; port 0 picks a free one (the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: String,
    /// Candidates per predict request, at most.
    #[arg(long, default_value_t = 1000)]
    pub(crate) max_candidates: usize,
    /// Request body size, at most, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub(crate) max_body_bytes: usize,
    /// Predict requests scored at once; more get 503.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_in_flight: usize,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
}

/// Binds the HTTP server over `state` with the serving routes and `extra` ones; returns it
/// (not yet running) and the addresses it listens on.
pub(crate) fn bind(
    state: web::Data<Serve>,
    http: &HttpArgs,
    extra: fn(&mut web::ServiceConfig),
) -> anyhow::Result<(actix_web::dev::Server, Vec<std::net::SocketAddr>)> {
    let max_body = http.max_body_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .configure(routes)
            .configure(extra)
    })
    .workers(http.workers)
    .disable_signals()
    .bind(&http.listen)
    .with_context(|| format!("listening on {}", http.listen))?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}

impl HttpArgs {
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(
            self.max_candidates >= 1,
            "--max-candidates must be at least 1"
        );
        Ok(())
    }
}

/// What the HTTP API serves from: `freshet serve`'s store follower, or a whole node.
#[derive(Debug)]
pub(crate) struct Serve {
    pub(crate) store: ModelStore,
    /// The cell predictions read (the first replica's).
    pub(crate) cell: Arc<ModelCell>,
    pub(crate) replicas: ReplicaSet,
    pub(crate) max_candidates: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) counters: Counters,
    /// Set by `freshet dev`: events, admin and the node's metrics.
    pub(crate) node: Option<crate::dev::Node>,
}

/// The serving routes, shared by `freshet serve` and `freshet dev`.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/predict", web::post().to(predict))
        .route("/v1/models", web::get().to(models))
        .route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics));
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

pub(crate) fn error(status: StatusCode, why: &str) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody { error: why })
}

/// Gives back an in-flight slot when a request ends, however it ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn predict(s: web::Data<Serve>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let c = &s.counters;
    if c.in_flight.fetch_add(1, Ordering::AcqRel) >= s.max_in_flight {
        c.in_flight.fetch_sub(1, Ordering::AcqRel);
        c.requests_shed.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::SERVICE_UNAVAILABLE, "overloaded: try again");
    }
    let _slot = Slot(&c.in_flight);
    let msgpack = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(MSGPACK));
    let parsed: Result<PredictRequest, String> = if msgpack {
        rmp_serde::from_slice(&body).map_err(|e| format!("not a predict request (msgpack): {e}"))
    } else {
        serde_json::from_slice(&body).map_err(|e| format!("not a predict request (JSON): {e}"))
    };
    let request = match parsed {
        Ok(r) => r,
        Err(why) => {
            c.requests_bad.fetch_add(1, Ordering::Relaxed);
            return error(StatusCode::BAD_REQUEST, &why);
        }
    };
    let Some(model) = s.cell.current() else {
        c.requests_failed.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no model version is served yet",
        );
    };
    let max = s.max_candidates;
    // Scoring is CPU work: off the HTTP worker, on the blocking pool.
    let scored = web::block(move || {
        let threads = Threads::new(1).map_err(|e| ServingError::Model(e.to_string()))?;
        model.predict(&request, max, &threads)
    })
    .await;
    match scored {
        Ok(Ok(r)) => {
            c.requests_ok.fetch_add(1, Ordering::Relaxed);
            c.items_scored
                .fetch_add(r.scores.len() as u64, Ordering::Relaxed);
            if msgpack {
                match rmp_serde::to_vec_named(&r) {
                    Ok(b) => HttpResponse::Ok().content_type(MSGPACK).body(b),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                }
            } else {
                HttpResponse::Ok().json(r)
            }
        }
        Ok(Err(ServingError::BadRequest(why))) => {
            c.requests_bad.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::BAD_REQUEST, &why)
        }
        Ok(Err(e)) => {
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "predict failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
        Err(e) => {
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
    }
}

#[derive(Serialize)]
struct ModelRow {
    version: u64,
    kind: String,
    parent: Option<u64>,
    step: u64,
    rows_trained: u64,
    samples_rejected: u64,
    sample_offsets: std::collections::BTreeMap<u32, u64>,
    created_unix_ms: u64,
    validation: Option<freshet_actors::ckpt::Validation>,
    rolled_back: Option<freshet_actors::ckpt::RolledBack>,
    replays: Vec<freshet_actors::ckpt::ReplayRecord>,
    calibrated_from: Option<freshet_actors::ckpt::CalibrationSource>,
    serving: bool,
}

async fn models(s: web::Data<Serve>) -> HttpResponse {
    let store = s.store.clone();
    let served = s.cell.version();
    let listed = web::block(move || -> Result<Vec<ModelRow>, String> {
        let mut rows = Vec::new();
        for v in store.versions().map_err(|e| e.to_string())? {
            // A version being written or removed meanwhile is left out, not an error.
            let Ok(m) = store.manifest(v) else { continue };
            rows.push(ModelRow {
                version: v,
                kind: format!("{:?}", m.kind).to_lowercase(),
                parent: m.parent,
                step: m.step,
                rows_trained: m.rows_trained,
                samples_rejected: m.samples_rejected,
                sample_offsets: m.sample_offsets,
                created_unix_ms: m.created_unix_ms,
                validation: m.validation,
                rolled_back: m.rolled_back,
                replays: m.replays,
                calibrated_from: m.calibrated_from,
                serving: served == Some(v),
            });
        }
        Ok(rows)
    })
    .await;
    match listed {
        Ok(Ok(rows)) => HttpResponse::Ok().json(serde_json::json!({
            "serving": served,
            "versions": rows,
        })),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn healthz(s: web::Data<Serve>) -> HttpResponse {
    match s.cell.version() {
        Some(v) => HttpResponse::Ok().json(serde_json::json!({"status": "ok", "serving": v})),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no model version is served yet",
        ),
    }
}

async fn metrics(s: web::Data<Serve>) -> HttpResponse {
    use std::fmt::Write;
    let c = &s.counters;
    let cell = s.cell.stats();
    let mut failures = 0;
    for r in s.replicas.handles() {
        failures += r.status().await.map_or(0, |st| st.failures);
    }
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    put(
        "freshet_predict_requests_total",
        "counter",
        "Predict requests by outcome.",
        &[
            ("{outcome=\"ok\"}", n(&c.requests_ok)),
            ("{outcome=\"bad_request\"}", n(&c.requests_bad)),
            ("{outcome=\"shed\"}", n(&c.requests_shed)),
            ("{outcome=\"failed\"}", n(&c.requests_failed)),
        ],
    );
    put(
        "freshet_predict_items_total",
        "counter",
        "Candidates scored.",
        &[("", n(&c.items_scored))],
    );
    put(
        "freshet_predict_in_flight",
        "gauge",
        "Predict requests being scored.",
        &[("", c.in_flight.load(Ordering::Relaxed) as f64)],
    );
    put(
        "freshet_serving_version",
        "gauge",
        "The model version being served (-1: none yet).",
        &[("", s.cell.version().map_or(-1.0, |v| v as f64))],
    );
    put(
        "freshet_serving_deltas_applied_total",
        "counter",
        "Deltas applied to the served model.",
        &[("", cell.deltas_applied as f64)],
    );
    put(
        "freshet_serving_installs_total",
        "counter",
        "Versions loaded whole (first load, rollback, gap).",
        &[("", cell.installs as f64)],
    );
    put(
        "freshet_serving_publish_failures_total",
        "counter",
        "Published versions the replica could not serve.",
        &[("", failures as f64)],
    );
    put(
        "freshet_serving_last_apply_ms",
        "gauge",
        "Time the last delta took to apply, in milliseconds.",
        &[("", cell.last_apply_ms)],
    );
    if let Some(node) = &s.node {
        crate::dev::write_metrics(node, &mut out).await;
    }
    HttpResponse::Ok()
        .content_type(ContentType::plaintext())
        .body(out)
}

/// Publishes every version after `after` that did not fail validation, oldest first.
fn publish_new(store: &ModelStore, replica: &ReplicaHandle, after: Option<u64>) -> Option<u64> {
    let versions = match store.versions() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "listing the model store");
            return after;
        }
    };
    let mut last = after;
    for v in versions.into_iter().filter(|&v| Some(v) > after) {
        let Ok(m) = store.manifest(v) else {
            // Written by a rename, so a manifest that does not read now never will: skip it.
            tracing::warn!(version = v, "unreadable manifest; not published");
            last = Some(v);
            continue;
        };
        if m.validation.as_ref().is_some_and(|val| !val.passed) {
            tracing::info!(version = v, "failed validation; not published");
        } else if let Err(e) = replica.publish(v) {
            tracing::error!(error = %e, "publishing to the replica");
            return last;
        }
        last = Some(v);
    }
    last
}

pub(crate) fn run(args: ServeArgs, settings: &Settings) -> anyhow::Result<()> {
    let root = args
        .store
        .clone()
        .unwrap_or_else(|| settings.node.data_dir.join("models"));
    let store = ModelStore::open_existing(&root)
        .with_context(|| format!("opening the model store {}", root.display()))?;
    args.http.check()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(args, store))
}

async fn serve(args: ServeArgs, store: ModelStore) -> anyhow::Result<()> {
    let cell = Arc::new(ModelCell::new());
    let (replica, _join) = ReplicaHandle::spawn(ReplicaArgs {
        name: "serve".into(),
        store: store.clone(),
        cell: cell.clone(),
        faults: Default::default(),
    })
    .await
    .context("starting the serving replica")?;
    let follower = {
        let (store, replica) = (store.clone(), replica.clone());
        let every = Duration::from_millis(args.poll_ms.max(1));
        tokio::spawn(async move {
            let mut after = None;
            loop {
                let (s, r) = (store.clone(), replica.clone());
                after = tokio::task::spawn_blocking(move || publish_new(&s, &r, after))
                    .await
                    .unwrap_or(after);
                tokio::time::sleep(every).await;
            }
        })
    };
    let replicas = ReplicaSet::with_len(1);
    replicas.set(0, replica.clone());
    let state = web::Data::new(Serve {
        store,
        cell,
        replicas,
        max_candidates: args.http.max_candidates,
        max_in_flight: args.http.max_in_flight,
        counters: Counters::default(),
        node: None,
    });
    let (server, addrs) = bind(state, &args.http, |_| {})?;
    for a in addrs {
        eprintln!("listening on http://{a}");
    }
    let handle = server.handle();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("shutting down");
            handle.stop(true).await;
        }
    });
    server.await.context("the HTTP server")?;
    follower.abort();
    replica.stop();
    Ok(())
}
