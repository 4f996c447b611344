//! The serving routes, shared by `freshet serve` and `freshet dev`: a ServingReplica's model
//! cell behind HTTP.
//!
//! The replica actor keeps the model cell at the newest published version; request handlers
//! read the cell directly (never through the actor's mailbox), so an update never queues a
//! prediction.
//!
//! Endpoints:
//! - `POST /v1/predict`: a [`PredictRequest`] as JSON, or msgpack with
//!   `Content-Type: application/msgpack`; the answer comes in the same encoding.
//! - `GET /v1/models`: every version in the store, its validation, and which one is served.
//! - `GET /healthz`: 200 once a version is served, 503 before, and 503 with the reason once the
//!   node behind it has stopped training for good.
//! - `GET /metrics`: Prometheus text.
//!
//! Limits: the body size (413 beyond it), the candidates per request (400), and the requests
//! scored at once (503 beyond it: load is shed instead of queued).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix_web::http::header::ContentType;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use freshet_actors::ckpt::ModelStore;
use freshet_actors::dense::Threads;
use freshet_actors::serving::{ModelCell, PredictRequest, ReplicaSet, ServingError};
use freshet_actors::telemetry;
use serde::Serialize;

use super::{error, Body, MSGPACK};

/// Counters exported on /metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests_ok: AtomicU64,
    requests_bad: AtomicU64,
    requests_shed: AtomicU64,
    requests_failed: AtomicU64,
    items_scored: AtomicU64,
    in_flight: AtomicUsize,
    /// Requests being scored now, and the most ever at once (at most the scoring threads).
    scoring: AtomicUsize,
    scoring_peak: AtomicUsize,
}

/// Lines a node adds to `/metrics`, beside serving's own.
pub(crate) trait MetricsSource: std::fmt::Debug + Send + Sync {
    /// Appends Prometheus text to `out`.
    fn write<'a>(&'a self, out: &'a mut String) -> Pin<Box<dyn Future<Output = ()> + 'a>>;
}

/// What the serving routes read: `freshet serve`'s store follower, or a whole node's replicas.
#[derive(Debug)]
pub(crate) struct ServingState {
    pub(crate) store: ModelStore,
    /// The cell predictions read (the first replica's).
    pub(crate) cell: Arc<ModelCell>,
    pub(crate) replicas: ReplicaSet,
    pub(crate) max_candidates: usize,
    pub(crate) max_in_flight: usize,
    /// One permit per scoring thread: an admitted request waits here, not on a thread of
    /// its own, so a burst never runs more scoring threads than there are cores.
    pub(crate) scoring: tokio::sync::Semaphore,
    pub(crate) counters: Counters,
    /// What else reports on `/metrics` (a node: its events, validation, trainer, supervisor).
    pub(crate) metrics: Vec<Arc<dyn MetricsSource>>,
    /// Why the node behind this server stopped training for good, once it has (its
    /// supervisor gave up): `/healthz` then answers 503 with the reason, while predictions
    /// go on from the last version served. Never set under `freshet serve`.
    pub(crate) stopped: Arc<std::sync::OnceLock<String>>,
    /// On a serving node of a cluster: the follower that brings its replica the trainer
    /// node's publications. `/healthz` says whether the trainer node is reachable.
    pub(crate) following: Option<freshet_cluster::node::follower::FollowerHandle>,
}

/// The serving routes, shared by `freshet serve` and `freshet dev`.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/predict", web::post().to(predict));
    ops_routes(cfg);
}

/// The serving routes of the operations port: all but predict.
pub(crate) fn ops_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/models", web::get().to(models))
        .route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics));
}

/// Gives back an in-flight slot when a request ends, however it ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `POST /v1/predict`, traced when export is on: the server span continues the caller's
/// `traceparent`, and the response carries the server span's own.
async fn predict(req: HttpRequest, s: web::Data<ServingState>, body: Body) -> HttpResponse {
    if !telemetry::enabled() {
        return predict_in(&s, body, &tracing::Span::none()).await;
    }
    let span = super::server_span(&req, "POST /v1/predict", "/v1/predict");
    let mut response = predict_in(&s, body, &span).await;
    super::end_server_span(&span, &mut response);
    response
}

async fn predict_in(s: &ServingState, body: Body, span: &tracing::Span) -> HttpResponse {
    let c = &s.counters;
    if c.in_flight.fetch_add(1, Ordering::AcqRel) >= s.max_in_flight {
        c.in_flight.fetch_sub(1, Ordering::AcqRel);
        c.requests_shed.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::SERVICE_UNAVAILABLE, "overloaded: try again");
    }
    let _slot = Slot(&c.in_flight);
    let msgpack = body.msgpack;
    let parsed: Result<PredictRequest, String> = if msgpack {
        rmp_serde::from_slice(&body.bytes)
            .map_err(|e| format!("not a predict request (msgpack): {e}"))
    } else {
        serde_json::from_slice(&body.bytes)
            .map_err(|e| format!("not a predict request (JSON): {e}"))
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
    telemetry::set_attribute(span, "freshet.version", model.version() as i64);
    telemetry::set_attribute(span, "freshet.candidates", request.candidates.len() as i64);
    let max = s.max_candidates;
    let Ok(_permit) = s.scoring.acquire().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping");
    };
    let now = c.scoring.fetch_add(1, Ordering::AcqRel) + 1;
    c.scoring_peak.fetch_max(now, Ordering::AcqRel);
    let _scoring = Slot(&c.scoring);
    // Scoring is CPU work: off the HTTP worker, on the blocking pool, as many at once as
    // there are permits.
    let score = if telemetry::is_sampled(span) {
        tracing::info_span!(target: telemetry::TARGET, parent: span, "predict.score",
            freshet.version = model.version() as i64,
            freshet.candidates = request.candidates.len() as i64)
    } else {
        tracing::Span::none()
    };
    let scored = web::block(move || {
        let _entered = score.enter();
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

async fn models(s: web::Data<ServingState>) -> HttpResponse {
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

async fn healthz(s: web::Data<ServingState>) -> HttpResponse {
    if let Some(why) = s.stopped.get() {
        return HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "down",
            "serving": s.cell.version(),
            "error": format!("the node stopped training for good: {why}"),
        }));
    }
    let Some(model) = s.cell.current() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no model version is served yet",
        );
    };
    let mut body = serde_json::json!({
        "status": "ok",
        "serving": model.version(),
        "version_age_ms": version_age_ms(model.manifest()),
    });
    // A serving node cut off from its trainer node still answers from what it has (200),
    // and says so: the version's age grows, `following.reachable` is false.
    if let Some(f) = &s.following {
        let st = f.status();
        if !st.reachable {
            body["status"] = "cut_off".into();
        }
        body["following"] = serde_json::to_value(&st).unwrap_or_default();
    }
    HttpResponse::Ok().json(body)
}

/// Milliseconds since `m` was written (0 for a clock that went back).
fn version_age_ms(m: &freshet_actors::ckpt::Manifest) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(m.created_unix_ms)
}

async fn metrics(s: web::Data<ServingState>) -> HttpResponse {
    use std::fmt::Write;
    let c = &s.counters;
    let cell = s.cell.stats();
    let mut failures = 0;
    for r in s.replicas.handles() {
        failures += r.status().await.map_or(0, |st| st.failures);
    }
    let following = s.following.as_ref().map(|f| f.status());
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
        "Predict requests admitted: being scored or waiting for a scoring thread.",
        &[("", c.in_flight.load(Ordering::Relaxed) as f64)],
    );
    put(
        "freshet_predict_scoring",
        "gauge",
        "Predict requests being scored.",
        &[("", c.scoring.load(Ordering::Relaxed) as f64)],
    );
    put(
        "freshet_predict_scoring_peak",
        "gauge",
        "The most predict requests ever scored at once (at most the scoring threads).",
        &[("", c.scoring_peak.load(Ordering::Relaxed) as f64)],
    );
    put(
        "freshet_serving_version",
        "gauge",
        "The model version being served (-1: none yet).",
        &[("", s.cell.version().map_or(-1.0, |v| v as f64))],
    );
    put(
        "freshet_serving_version_age_seconds",
        "gauge",
        "Seconds since the served version was written (-1: none served yet).",
        &[(
            "",
            s.cell
                .current()
                .map_or(-1.0, |m| version_age_ms(m.manifest()) as f64 / 1e3),
        )],
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
    if let Some(f) = following {
        put(
            "freshet_follower_source_reachable",
            "gauge",
            "1 while the trainer node this serving node follows is reachable, 0 cut off.",
            &[("", f64::from(u8::from(f.reachable)))],
        );
        put(
            "freshet_follower_last_heard_seconds",
            "gauge",
            "Seconds since the trainer node last answered or sent a publication (-1: never).",
            &[("", f.last_heard_ms_ago.map_or(-1.0, |ms| ms as f64 / 1e3))],
        );
        put(
            "freshet_follower_versions_fetched_total",
            "counter",
            "Versions fetched from the trainer node into the mirror.",
            &[("", f.versions_fetched as f64)],
        );
        put(
            "freshet_follower_bytes_fetched_total",
            "counter",
            "Bytes of versions fetched from the trainer node.",
            &[("", f.bytes_fetched as f64)],
        );
        put(
            "freshet_follower_fetch_seconds_total",
            "counter",
            "Time spent fetching versions from the trainer node.",
            &[("", f.fetch_ms_total / 1e3)],
        );
        put(
            "freshet_follower_write_seconds_total",
            "counter",
            "Time spent writing fetched versions to the mirror, checks included.",
            &[("", f.write_ms_total / 1e3)],
        );
        put(
            "freshet_follower_notices_total",
            "counter",
            "Notices of publication received from the trainer node.",
            &[("", f.notices as f64)],
        );
        put(
            "freshet_follower_failures_total",
            "counter",
            "Publications the follower could not bring (fetch or write failed); retried.",
            &[("", f.failures as f64)],
        );
    }
    for m in &s.metrics {
        m.write(&mut out).await;
    }
    crate::telemetry::write_metrics(&mut out);
    HttpResponse::Ok()
        .content_type(ContentType::plaintext())
        .body(out)
}
