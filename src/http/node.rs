//! The routes only a whole node has (`freshet dev`): `POST /v1/events`, and the admin API
//! over the node's pipeline (status, rollback, replay, calibration).
//!
//! Admin requests need `Authorization: Bearer <token>` when the node was given a token.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use freshet_actors::intake::{admit, Intake};
use freshet_actors::online::pipeline::{CommandError, PipelineHandle};
use freshet_actors::stream::StreamLog;
use freshet_actors::training::feed::ReplayPlan;
use serde::{Deserialize, Serialize};

use super::serving::MetricsSource;
use super::{error, ServingState};

/// The node behind its routes: the pipeline, where refused events go, the admin token, and
/// the events counters.
#[derive(Debug)]
pub(crate) struct NodeState {
    pub(crate) pipe: PipelineHandle,
    pub(crate) ingest_rejects: Arc<dyn StreamLog>,
    pub(crate) token: Option<String>,
    pub(crate) events_accepted: AtomicU64,
    pub(crate) events_rejected: AtomicU64,
}

impl MetricsSource for NodeState {
    fn write<'a>(&'a self, out: &'a mut String) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(write_metrics(self, out))
    }
}

/// The node's lines of `/metrics`.
async fn write_metrics(node: &NodeState, out: &mut String) {
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
        // Left out while the log cannot say: an absent series reads as unknown, a zero would
        // read as caught up.
        if let Some(lag) = t.lag {
            put(
                "freshet_trainer_lag_samples",
                "gauge",
                "Samples in the log the trainer has not consumed.",
                lag as f64,
            );
        }
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

#[derive(Serialize)]
struct Refused {
    line: usize,
    reason: String,
    error: String,
}

/// `POST /v1/events`: JSON lines of events. Each valid line is appended; each invalid one is
/// dead-lettered and reported with its line number. 200 when any line was accepted or the
/// body held none; 400 when every line was refused; 503, accepting nothing, once the node has
/// stopped training for good.
async fn events(n: web::Data<NodeState>, body: web::Bytes) -> HttpResponse {
    // Nothing would ever train them: the client must keep them or send them elsewhere.
    if let Some(why) = n.pipe.gave_up() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the node stopped training for good, so it accepts no events: {why}"),
        );
    }
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
fn admin<'a>(n: &'a NodeState, req: &HttpRequest) -> Result<&'a NodeState, Box<HttpResponse>> {
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

async fn admin_status(n: web::Data<NodeState>, req: HttpRequest) -> HttpResponse {
    let n = match admin(&n, &req) {
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

async fn admin_rollback(
    s: web::Data<ServingState>,
    n: web::Data<NodeState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let n = match admin(&n, &req) {
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

async fn admin_replay(n: web::Data<NodeState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let n = match admin(&n, &req) {
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

async fn admin_calibrate(
    n: web::Data<NodeState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let n = match admin(&n, &req) {
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
