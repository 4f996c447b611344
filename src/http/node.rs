//! The routes only a whole node has (`freshet dev`): `POST /v1/events`, and the admin API
//! over the node's pipeline (status, rollback, replay, calibration).
//!
//! Admin requests need `Authorization: Bearer <token>` when the node was given a token.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use freshet_actors::intake::{admit_traced, Intake};
use freshet_actors::online::pipeline::{CommandError, PipelineHandle};
use freshet_actors::stream::StreamLog;
use freshet_actors::telemetry;
use freshet_actors::training::feed::ReplayPlan;
use serde::{Deserialize, Serialize};

use super::serving::MetricsSource;
use super::{error, Body, ServingState};

/// The node behind its routes: the pipeline, where refused events go, the admin token, where
/// base stores may be, and the events counters.
#[derive(Debug)]
pub(crate) struct NodeState {
    pub(crate) pipe: PipelineHandle,
    pub(crate) ingest_rejects: Arc<dyn StreamLog>,
    pub(crate) token: Option<String>,
    /// Canonical; `calibrate` opens base stores under it and nowhere else.
    pub(crate) bases_dir: PathBuf,
    pub(crate) events_accepted: AtomicU64,
    pub(crate) events_rejected: AtomicU64,
    /// The cluster this node coordinates (`freshet node --roles trainer,...`); none for
    /// `freshet dev`.
    pub(crate) cluster: Option<freshet_cluster::node::ClusterNode>,
    /// Its failover and rebalance, with a cluster.
    pub(crate) placements: Option<Arc<crate::failover::Placements>>,
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

/// A node's routes on `port`: events on the main port only, the admin API on both.
pub(crate) fn routes(cfg: &mut web::ServiceConfig, port: super::Port) {
    if port == super::Port::Main {
        cfg.route("/v1/events", web::post().to(events));
    }
    cfg.route("/v1/admin/status", web::get().to(admin_status))
        .route("/v1/admin/nodes", web::get().to(admin_nodes))
        .route("/v1/admin/rollback", web::post().to(admin_rollback))
        .route("/v1/admin/rebalance", web::post().to(admin_rebalance))
        .route("/v1/admin/replay", web::post().to(admin_replay))
        .route("/v1/admin/calibrate", web::post().to(admin_calibrate));
}

#[derive(Debug, Serialize)]
struct Refused {
    line: usize,
    reason: String,
    error: String,
}

/// `POST /v1/events`: JSON lines of events.
///
/// The whole body is checked before anything is appended. Each invalid line (malformed, or too
/// large for a record) is dead-lettered, in a cut form when it is large, and reported with its
/// line number; it never fails the good lines. Then:
/// - 200 says how many events were appended (`accepted`), when any line was good or the body
///   held none;
/// - 400, when every line was refused;
/// - 503 means nothing was appended: the event log refused the append, or the node stopped
///   training for good. A client may retry the whole body.
///
/// The events of one body go to several partitions, one append each. Should the log fail after
/// some partitions took theirs, the answer is still 200 with the count that was appended, and
/// the lines that were not are listed as refused with reason `log_unavailable`, for the client
/// to send again: a retry of the whole body would duplicate the rest.
async fn events(req: HttpRequest, n: web::Data<NodeState>, body: Body) -> HttpResponse {
    if !telemetry::enabled() {
        return events_in(&n, body, &tracing::Span::none()).await;
    }
    let span = super::server_span(&req, "POST /v1/events", "/v1/events");
    let mut response = events_in(&n, body, &span).await;
    super::end_server_span(&span, &mut response);
    response
}

async fn events_in(n: &NodeState, body: Body, span: &tracing::Span) -> HttpResponse {
    if let Err(r) = body.json_only() {
        return *r;
    }
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
    let bytes = body.bytes;
    // The append is a producer span; each event it appends without a trace of its own joins
    // it, so the joiner's spans for those events continue this request's trace.
    let append = if telemetry::is_sampled(span) {
        tracing::info_span!(target: telemetry::TARGET, parent: span, "events send",
            otel.kind = "producer", messaging.system = "freshet",
            messaging.operation.type = "send", messaging.operation.name = "append",
            messaging.destination.name = log.topic(),
            messaging.batch.message_count = tracing::field::Empty)
    } else {
        tracing::Span::none()
    };
    let trace = telemetry::context_of(&append).traceparent;
    let done = web::block(move || {
        let r = append_events(&bytes, &*log, &*rejects, parts, trace.as_deref());
        if let Ok(a) = &r {
            append.record("messaging.batch.message_count", a.accepted as i64);
        }
        r
    })
    .await;
    match done {
        Ok(Ok(Appended {
            accepted,
            refused,
            invalid,
        })) => {
            n.events_accepted
                .fetch_add(accepted as u64, Ordering::Relaxed);
            n.events_rejected
                .fetch_add(invalid as u64, Ordering::Relaxed);
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
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "POST /v1/events appended nothing");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("nothing was appended: {e}"),
            )
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// What one events body became.
#[derive(Debug)]
struct Appended {
    /// Events appended.
    accepted: usize,
    /// Lines not appended, with why: the invalid ones, then any the log did not take.
    refused: Vec<Refused>,
    /// Of `refused`, the invalid lines (dead-lettered).
    invalid: usize,
}

/// Checks every line of `body`, dead-letters the invalid ones, then appends the events one
/// partition at a time. `Err` only when nothing at all was appended.
fn append_events(
    body: &[u8],
    log: &dyn StreamLog,
    rejects: &dyn StreamLog,
    parts: u32,
    trace: Option<&str>,
) -> Result<Appended, String> {
    // Per partition, the line numbers and records of its events, in body order.
    let mut pending: Vec<(Vec<usize>, Vec<Vec<u8>>)> = vec![Default::default(); parts as usize];
    let mut refused = Vec::new();
    let mut dead = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        match admit_traced(line, i as u64 + 1, "http:/v1/events", parts, trace) {
            Intake::Blank => {}
            Intake::Event { partition, record } => {
                let (lines, recs) = &mut pending[partition as usize];
                lines.push(i + 1);
                recs.push(record);
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
    let invalid = refused.len();
    // The dead letters first: a refused line is kept before any good one is appended, so no
    // answer can leave it lost.
    if !dead.is_empty() {
        let refs: Vec<&[u8]> = dead.iter().map(Vec::as_slice).collect();
        rejects
            .append(0, &refs)
            .map_err(|e| format!("the dead-letter log refused the refused lines: {e}"))?;
    }
    let mut accepted = 0;
    let mut failure: Option<String> = None;
    for (p, (lines, recs)) in pending.iter().enumerate() {
        if recs.is_empty() {
            continue;
        }
        if failure.is_none() {
            let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
            match log.append(p as u32, &refs) {
                Ok(_) => {
                    accepted += recs.len();
                    continue;
                }
                Err(e) => failure = Some(format!("the event log refused the append: {e}")),
            }
        }
        let why = failure.clone().unwrap_or_default();
        refused.extend(lines.iter().map(|&line| Refused {
            line,
            reason: "log_unavailable".to_owned(),
            error: why.clone(),
        }));
    }
    match failure {
        Some(e) if accepted == 0 => Err(e),
        _ => {
            refused.sort_by_key(|r| r.line);
            Ok(Appended {
                accepted,
                refused,
                invalid,
            })
        }
    }
}

/// The node if the request may use the admin API, else the answer to give.
fn admin<'a>(n: &'a NodeState, req: &HttpRequest) -> Result<&'a NodeState, Box<HttpResponse>> {
    if let Some(token) = &n.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            return Err(Box::new(HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                .json(serde_json::json!({"error": "the admin API needs `Authorization: Bearer <token>`"}))));
        }
    }
    Ok(n)
}

/// The credentials of an `Authorization` value whose scheme is `Bearer`, in any case (RFC 9110
/// makes auth schemes case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// Whether `given` is `secret`, in a time that depends on the secret's length alone: every
/// byte of the secret is compared whatever `given` holds, so timing tells nothing of how much
/// of a guess was right.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != secret.len());
    for (i, &s) in secret.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ s;
    }
    std::hint::black_box(diff) == 0
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

fn parse<T: serde::de::DeserializeOwned>(body: &Body) -> Result<T, Box<HttpResponse>> {
    serde_json::from_slice(body.json_only()?).map_err(|e| {
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

/// Every node of the cluster (`ctl nodes`); for `freshet dev`, the one process with every role.
async fn admin_nodes(n: web::Data<NodeState>, req: HttpRequest) -> HttpResponse {
    use freshet_cluster::membership::{Liveness, Roles};
    use freshet_cluster::node::{memory_now, HostedShard, NodeRow};
    let n = match admin(&n, &req) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let rows = match &n.cluster {
        Some(c) => c.nodes(),
        None => {
            let (used, available) = memory_now();
            vec![NodeRow {
                node: "dev".into(),
                roles: Roles::all().to_string(),
                state: Liveness::Up,
                addr: String::new(),
                heard_ms_ago: None,
                session: true,
                memory_used_bytes: used,
                memory_available_bytes: available,
                shards: (0..n.pipe.shard_count())
                    .map(|shard| HostedShard {
                        shard,
                        placed_by: "dev".into(),
                    })
                    .collect(),
            }]
        }
    };
    HttpResponse::Ok().json(serde_json::json!({ "nodes": rows }))
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
    body: Body,
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

async fn admin_rebalance(n: web::Data<NodeState>, req: HttpRequest, body: Body) -> HttpResponse {
    let n = match admin(&n, &req) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    // It takes no field: the body is `{}`.
    let fields: serde_json::Map<String, serde_json::Value> = match parse(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    if let Some(k) = fields.keys().next() {
        let why = format!("bad request body: unknown field `{k}`: a rebalance takes none");
        return error(StatusCode::BAD_REQUEST, &why);
    }
    let Some(placements) = &n.placements else {
        return command_error(CommandError::Conflict(
            "this node runs every shard in its own process: there is nothing to rebalance".into(),
        ));
    };
    match placements.rebalance("asked by the admin API").await {
        Ok(r) => HttpResponse::Ok().json(r),
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

async fn admin_replay(n: web::Data<NodeState>, req: HttpRequest, body: Body) -> HttpResponse {
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

async fn admin_calibrate(n: web::Data<NodeState>, req: HttpRequest, body: Body) -> HttpResponse {
    let n = match admin(&n, &req) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let b: CalibrateBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let base = match confined(&n.bases_dir, &b.base) {
        Some(p) => p,
        // One answer for every path outside, existing or not, so that the endpoint tells
        // nothing about the rest of the file system.
        None => {
            return error(
                StatusCode::FORBIDDEN,
                &format!(
                    "a base store must lie under {} (node.bases_dir)",
                    n.bases_dir.display()
                ),
            )
        }
    };
    match n.pipe.calibrate(base, b.version).await {
        Ok(v) => HttpResponse::Ok().json(serde_json::json!({"installed_version": v})),
        Err(e) => command_error(e),
    }
}

/// `path` if it lies under `root` (canonical), following symbolic links; a path that does not
/// exist lies under `root` when its absolute form, with `.` and `..` resolved, does.
fn confined(root: &Path, path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    match std::fs::canonicalize(path) {
        Ok(real) => real.starts_with(root).then_some(real),
        Err(_) => {
            let mut lexical = PathBuf::new();
            for c in path.components() {
                match c {
                    std::path::Component::ParentDir => {
                        lexical.pop();
                    }
                    std::path::Component::CurDir => {}
                    c => lexical.push(c),
                }
            }
            lexical.starts_with(root).then_some(lexical)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use freshet_actors::event::DeadLetter;
    use freshet_actors::stream::{
        AppendAck, EmbeddedLog, LogConfig, LogError, Offset, Record, MAX_RECORD_BYTES,
    };

    use super::*;

    /// A log whose partitions from `fail_from` on refuse every append.
    #[derive(Debug)]
    struct Failing {
        inner: EmbeddedLog,
        fail_from: u32,
    }

    impl StreamLog for Failing {
        fn topic(&self) -> &str {
            self.inner.topic()
        }
        fn partitions(&self) -> u32 {
            self.inner.partitions()
        }
        fn append(&self, partition: u32, records: &[&[u8]]) -> Result<AppendAck, LogError> {
            if partition >= self.fail_from {
                return Err(LogError::RecordTooLarge { size: 0, max: 0 });
            }
            self.inner.append(partition, records)
        }
        fn read(&self, p: u32, from: Offset, max: usize) -> Result<Vec<Record>, LogError> {
            self.inner.read(p, from, max)
        }
        fn high_watermark(&self, p: u32) -> Result<Offset, LogError> {
            self.inner.high_watermark(p)
        }
        fn low_watermark(&self, p: u32) -> Result<Offset, LogError> {
            self.inner.low_watermark(p)
        }
        fn wait_for(&self, p: u32, o: Offset, t: Duration) -> Result<Offset, LogError> {
            self.inner.wait_for(p, o, t)
        }
        fn flush(&self) -> Result<(), LogError> {
            self.inner.flush()
        }
        fn commit(&self, g: &str, p: u32, o: Offset) -> Result<(), LogError> {
            self.inner.commit(g, p, o)
        }
        fn committed(&self, g: &str, p: u32) -> Result<Option<Offset>, LogError> {
            self.inner.committed(g, p)
        }
    }

    fn log(dir: &std::path::Path, topic: &str, fail_from: u32) -> Failing {
        let cfg = LogConfig {
            partitions: 4,
            ..LogConfig::default()
        };
        Failing {
            inner: EmbeddedLog::open(dir, topic, cfg).unwrap(),
            fail_from,
        }
    }

    fn body(good: usize, bad_line_bytes: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for i in 0..good {
            b.extend_from_slice(
                format!(
                    r#"{{"type": "impression", "request_id": "r-{i}", "time_ms": 5, "user": "u", "item": "i"}}"#
                )
                .as_bytes(),
            );
            b.push(b'\n');
        }
        b.extend(std::iter::repeat_n(b'x', bad_line_bytes));
        b
    }

    fn total(log: &dyn StreamLog) -> u64 {
        (0..log.partitions())
            .map(|p| log.high_watermark(p).unwrap())
            .sum()
    }

    #[test]
    fn good_lines_are_appended_and_counted_beside_a_line_too_large_for_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let (events, rejects) = (log(dir.path(), "events", 4), log(dir.path(), "rejects", 4));
        let a = append_events(&body(8, 1 << 20), &events, &rejects, 4, None).unwrap();
        assert_eq!((a.accepted, a.invalid, a.refused.len()), (8, 1, 1));
        assert_eq!(
            (a.refused[0].line, a.refused[0].reason.as_str()),
            (9, "too_large")
        );
        assert_eq!(total(&events), 8);
        let kept = rejects.read(0, 0, 10).unwrap();
        assert_eq!(kept.len(), 1, "the large line is dead-lettered");
        assert!(kept[0].payload.len() <= MAX_RECORD_BYTES);
        let d = DeadLetter::from_msgpack(&kept[0].payload).unwrap();
        assert_eq!((d.offset, d.reason.as_str()), (9, "too_large"));
        assert!(d.detail.contains("1048576"), "{}", d.detail);
    }

    #[test]
    fn a_log_that_takes_nothing_is_an_error_and_a_partial_append_lists_what_it_missed() {
        let dir = tempfile::tempdir().unwrap();
        let rejects = log(dir.path(), "rejects", 4);
        // Nothing taken: Err, which the route answers 503.
        let none = log(dir.path(), "none", 0);
        assert!(append_events(&body(8, 0), &none, &rejects, 4, None).is_err());
        assert_eq!(total(&none), 0);
        // Partitions 0 and 1 take theirs, 2 fails (and 3 is not tried): the count is what was
        // appended, and every line that was not is listed, to be sent again.
        let some = log(dir.path(), "some", 2);
        let a = append_events(&body(40, 0), &some, &rejects, 4, None).unwrap();
        assert_eq!(a.accepted as u64, total(&some));
        assert!(a.accepted > 0 && a.accepted < 40, "{}", a.accepted);
        assert_eq!(a.accepted + a.refused.len(), 40);
        assert!(a.refused.iter().all(|r| r.reason == "log_unavailable"));
        assert!(a.refused.windows(2).all(|w| w[0].line < w[1].line));
        assert_eq!(a.invalid, 0);
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_secrets_in_full() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert!(same_secret(b"s3cret", b"s3cret"));
        for wrong in [&b""[..], b"s", b"s3cre", b"s3cret!", b"S3cret", b"s3creT"] {
            assert!(!same_secret(wrong, b"s3cret"), "{wrong:?}");
        }
    }

    #[test]
    fn only_paths_under_the_bases_directory_are_confined_there() {
        let root = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        let base = root.join("base");
        std::fs::create_dir(&base).unwrap();
        assert_eq!(confined(&root, &base), Some(base.clone()));
        assert_eq!(
            confined(&root, &root.join("missing")),
            Some(root.join("missing"))
        );
        for outside in [
            PathBuf::from("/etc"),
            PathBuf::from("/nonexistent/x"),
            root.join("../elsewhere"),
            root.join("missing/../../x"),
            PathBuf::from("relative"),
        ] {
            assert_eq!(confined(&root, &outside), None, "{}", outside.display());
        }
        // A link inside that leads outside is outside.
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert_eq!(confined(&root, &root.join("link")), None);
    }
}
