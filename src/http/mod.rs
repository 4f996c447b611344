//! The HTTP API: the serving routes ([`serving`]) that `freshet serve` and `freshet dev` share,
//! and the node routes ([`node`]: events and admin) that only a whole node has.
//!
//! Both kinds of server are built by [`bind`]: the serving state always, plus whatever routes
//! and state the caller adds. The serving routes know a node only through
//! [`serving::MetricsSource`], the lines it adds to `/metrics`.
//!
//! Every server has two ports. `--listen` takes all routes. The operations port
//! (`--ops-listen`) takes `/healthz`, `/metrics`, `/v1/models` and the admin API again, on an
//! HTTP worker thread, an accept thread and a connection budget of its own: a probe, a scraper
//! or an operator's rollback is answered there while predict load, or a flood of connections
//! that fills `--listen`'s budget, keeps the main workers busy.

pub(crate) mod node;
pub(crate) mod serving;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use anyhow::Context;
use clap::Args;
use serde::Serialize;

pub(crate) use serving::{Counters, ServingState};

use crate::settings::HttpSettings;

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
    /// Predict requests admitted at once (scoring or waiting for a scoring thread); more
    /// get 503 at once.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_in_flight: usize,
    /// Predict requests scored at the same time (default: twice the cores this process may
    /// use). A scoring also waits on memory, so two per core keep the cores busy; more only
    /// take CPU from the HTTP workers and the pipeline, and each keeps its own buffers.
    #[arg(long)]
    pub(crate) scoring_threads: Option<usize>,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
    /// Address of the operations port: `/healthz`, `/metrics`, `/v1/models` and the admin
    /// API, on a worker and connections of their own, so that predict load on `--listen`
    /// never delays them. Default: the host of `--listen` and the port after its port (port 0,
    /// a free one, when `--listen`'s is 0). `off`: no operations port.
    #[arg(long, value_name = "ADDR|off")]
    pub(crate) ops_listen: Option<String>,
}

impl HttpArgs {
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(
            self.scoring_threads != Some(0),
            "--scoring-threads must be at least 1"
        );
        anyhow::ensure!(
            self.max_candidates >= 1,
            "--max-candidates must be at least 1"
        );
        Ok(())
    }
}

impl HttpArgs {
    /// The operations port's address (`--ops-listen`, or the port after `--listen`'s), or
    /// None when it is `off`.
    pub(crate) fn ops_addr(&self) -> anyhow::Result<Option<String>> {
        use std::net::ToSocketAddrs;
        match self.ops_listen.as_deref() {
            Some("off") => Ok(None),
            Some(a) => Ok(Some(a.to_owned())),
            None => {
                let main = self
                    .listen
                    .to_socket_addrs()
                    .with_context(|| format!("resolving --listen {}", self.listen))?
                    .next()
                    .with_context(|| format!("--listen {} names no address", self.listen))?;
                let port = match main.port() {
                    0 => 0,
                    p => p.checked_add(1).with_context(|| {
                        format!(
                            "--listen {} takes the last port, so the operations port cannot \
                             be the next one: give --ops-listen ADDR, or --ops-listen off",
                            self.listen
                        )
                    })?,
                };
                Ok(Some(std::net::SocketAddr::new(main.ip(), port).to_string()))
            }
        }
    }

    /// Predict requests scored at once: `--scoring-threads`, else twice the cores available.
    pub(crate) fn scoring_threads(&self) -> usize {
        self.scoring_threads.unwrap_or_else(|| {
            2 * std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// The bound sockets of a server: `--listen`'s, and the operations port's unless it is off.
#[derive(Debug)]
pub(crate) struct Listeners {
    main: std::net::TcpListener,
    ops: Option<(String, std::net::TcpListener)>,
}

/// Binds the server's addresses, before anything else starts, so that a taken address is
/// refused before a command writes anything.
pub(crate) fn listen(http: &HttpArgs) -> anyhow::Result<Listeners> {
    let main = std::net::TcpListener::bind(&http.listen).with_context(|| {
        format!(
            "listening on {} (a server also takes the port after its --listen port for its \
             operations port, unless --ops-listen says otherwise)",
            http.listen
        )
    })?;
    let ops = match http.ops_addr()? {
        None => None,
        Some(a) => {
            // The default follows the address the main port took, not a second resolution
            // of a host name.
            let a = match (&http.ops_listen, main.local_addr()) {
                (None, Ok(at)) => {
                    let port = if a.ends_with(":0") {
                        0
                    } else {
                        at.port().saturating_add(1)
                    };
                    std::net::SocketAddr::new(at.ip(), port).to_string()
                }
                _ => a,
            };
            let l = std::net::TcpListener::bind(&a).with_context(|| {
                format!("listening on {a} (the operations port; --ops-listen moves it)")
            })?;
            Some((a, l))
        }
    };
    Ok(Listeners { main, ops })
}

/// Which of a server's two ports routes are being added to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Port {
    /// `--listen`: every route.
    Main,
    /// `--ops-listen`: health, metrics, models and admin only.
    Ops,
}

/// A server's two HTTP servers, built but not yet running.
pub(crate) struct Servers {
    main: actix_web::dev::Server,
    ops: Option<actix_web::dev::Server>,
    /// The addresses `--listen` took.
    pub(crate) addrs: Vec<std::net::SocketAddr>,
    /// The addresses the operations port took.
    pub(crate) ops_addrs: Vec<std::net::SocketAddr>,
}

impl Servers {
    /// Prints where the server listens: the `listening on http://ADDR` lines that scripts
    /// and tests wait for, then the operations port and what it serves (`admin`: whether the
    /// server has the admin API).
    pub(crate) fn announce(&self, admin: bool) {
        for a in &self.addrs {
            eprintln!("listening on http://{a}");
        }
        let routes = if admin {
            "/healthz, /metrics, /v1/models, admin"
        } else {
            "/healthz, /metrics, /v1/models"
        };
        for a in &self.ops_addrs {
            eprintln!("operations on http://{a} ({routes})");
        }
    }

    /// Runs both servers on the current runtime.
    pub(crate) fn spawn(self) -> Running {
        let mut handles = vec![self.main.handle()];
        let mut joins = vec![tokio::spawn(self.main)];
        if let Some(ops) = self.ops {
            handles.push(ops.handle());
            joins.push(tokio::spawn(ops));
        }
        Running { handles, joins }
    }
}

/// A server's running HTTP servers.
pub(crate) struct Running {
    handles: Vec<actix_web::dev::ServerHandle>,
    joins: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// A handle that stops both servers.
    pub(crate) fn stopper(&self) -> Stopper {
        Stopper(self.handles.clone())
    }

    /// Waits until both servers have stopped; the first error, if any, after both.
    pub(crate) async fn join(self) -> anyhow::Result<()> {
        let mut first = Ok(());
        for j in self.joins {
            let r = match j.await {
                Ok(r) => r.context("the HTTP server"),
                Err(e) => Err(e).context("the HTTP server's task"),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Stops both servers gracefully (answers in progress finish), and waits for them.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.stopper().stop().await;
        self.join().await
    }
}

/// Stops a server's HTTP servers.
#[derive(Clone)]
pub(crate) struct Stopper(Vec<actix_web::dev::ServerHandle>);

impl Stopper {
    /// Stops both at once: each `stop` sends its command at the call, so both drain
    /// together and the stop takes the longer drain, not the sum.
    pub(crate) async fn stop(&self) {
        let stopping: Vec<_> = self.0.iter().map(|h| h.stop(true)).collect();
        for s in stopping {
            s.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_connections;

    #[test]
    fn connections_split_as_configured_under_a_loose_cap_and_by_share_under_a_tight_one() {
        assert_eq!(split_connections(8, 64, 72), (8, 64));
        assert_eq!(split_connections(8, 64, 1 << 20), (8, 64));
        assert_eq!(split_connections(1024, 0, 512), (512, 0));
        assert_eq!(split_connections(8, 0, 1 << 20), (8, 0));
        // A cap of 128 over 1024 + 64: the operations port keeps its share.
        assert_eq!(split_connections(1024, 64, 128), (121, 7));
        assert_eq!(split_connections(8, 64, 2), (1, 1));
        assert_eq!(split_connections(8, 64, 1), (1, 1));
        for (m, o, c) in [(8, 64, 40), (1024, 64, 300), (5, 5, 6)] {
            let (a, b) = split_connections(m, o, c);
            assert!(a <= m && b <= o && a + b <= c, "{m} {o} {c}: {a} {b}");
        }
    }
}

/// Builds the HTTP servers on `listeners` over `state`: the serving routes, plus what `extra`
/// adds to each [`Port`] (a node's routes and their state). Returns them not yet running. The
/// connection bounds come from `[http]`; both ports' connections together are at most half
/// of the process's file-descriptor limit, which is raised to its hard limit first.
pub(crate) fn bind(
    state: web::Data<ServingState>,
    http: &HttpArgs,
    limits: &HttpSettings,
    listeners: Listeners,
    extra: impl Fn(&mut web::ServiceConfig, Port) + Clone + Send + 'static,
) -> anyhow::Result<Servers> {
    let ops_wanted = if listeners.ops.is_some() {
        limits.ops_max_connections
    } else {
        0
    };
    let configured = limits.max_connections + ops_wanted;
    let cap = match crate::fdlimit::raise() {
        Ok(l) => {
            if let Some(from) = l.raised_from {
                tracing::info!(from, to = l.soft, "raised the open-file limit");
            }
            let cap = crate::fdlimit::connection_cap(configured, l.soft);
            if cap < configured {
                tracing::warn!(
                    configured,
                    cap,
                    open_file_limit = l.soft,
                    "http.max_connections and http.ops_max_connections are more than half the \
                     open-file limit; capped, so that the pipeline keeps the other half"
                );
            }
            cap
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            configured
        }
    };
    let (main_cap, ops_cap) = split_connections(limits.max_connections, ops_wanted, cap);
    let app = {
        let state = state.clone();
        let max_body = http.max_body_bytes;
        let body_timeout = BodyTimeout(Duration::from_millis(limits.body_timeout_ms));
        move |port: Port| {
            let extra = extra.clone();
            let app = App::new()
                .app_data(state.clone())
                .app_data(web::PayloadConfig::new(max_body))
                .app_data(body_timeout);
            match port {
                Port::Main => app.configure(serving::routes),
                Port::Ops => app.configure(serving::ops_routes),
            }
            .configure(move |cfg| extra(cfg, port))
        }
    };
    let workers = http.workers;
    let main = {
        let app = app.clone();
        HttpServer::new(move || app(Port::Main))
            .workers(workers)
            // Per worker in actix; the total over workers is the cap.
            .max_connections(main_cap.div_ceil(workers).max(1))
            .client_request_timeout(Duration::from_millis(limits.header_timeout_ms))
            .keep_alive(Duration::from_millis(limits.keep_alive_ms))
            .disable_signals()
            .listen(listeners.main)
            .with_context(|| format!("listening on {}", http.listen))?
    };
    let addrs = main.addrs();
    let (ops, ops_addrs) = match listeners.ops {
        None => (None, Vec::new()),
        Some((at, listener)) => {
            let ops = HttpServer::new(move || app(Port::Ops))
                // One worker of its own: its routes answer in microseconds, and a thread
                // apart from the main workers is what keeps them answering under load.
                .workers(1)
                .max_connections(ops_cap)
                .client_request_timeout(Duration::from_millis(limits.header_timeout_ms))
                .keep_alive(Duration::from_millis(limits.keep_alive_ms))
                .disable_signals()
                .listen(listener)
                .with_context(|| format!("listening on {at} (the operations port)"))?;
            let addrs = ops.addrs();
            (Some(ops.run()), addrs)
        }
    };
    Ok(Servers {
        main: main.run(),
        ops,
        addrs,
        ops_addrs,
    })
}

/// The connections of the main port and of the operations port (`ops`, 0 when off) under a
/// cap of `cap` on both: as configured when the cap allows, else each its share of the cap,
/// never more than configured and at least one.
fn split_connections(main: usize, ops: usize, cap: usize) -> (usize, usize) {
    if ops == 0 {
        return (main.min(cap).max(1), 0);
    }
    if cap >= main + ops {
        return (main, ops);
    }
    let ops_cap = (cap * ops / (main + ops)).max(1);
    (cap.saturating_sub(ops_cap).clamp(1, main), ops_cap)
}

/// How long a request body may take to arrive, from `[http] body_timeout_ms`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyTimeout(pub(crate) Duration);

/// A request body, read whole within the body timeout and the body size limit, and its
/// encoding, from `Content-Type`: JSON (also when the header is absent, and for JSON lines) or
/// msgpack. Any other type is refused with 415 before a byte of the body is read.
#[derive(Debug)]
pub(crate) struct Body {
    pub(crate) bytes: web::Bytes,
    pub(crate) msgpack: bool,
}

impl Body {
    /// 415 for a msgpack body on a route that takes JSON only.
    pub(crate) fn json_only(&self) -> Result<&[u8], Box<HttpResponse>> {
        if self.msgpack {
            return Err(Box::new(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "this route takes JSON (Content-Type: application/json), not msgpack",
            )));
        }
        Ok(&self.bytes)
    }
}

impl actix_web::FromRequest for Body {
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let kind = body_kind(req);
        let timeout = req
            .app_data::<BodyTimeout>()
            .map_or(Duration::from_secs(10), |t| t.0);
        let read = <web::Bytes as actix_web::FromRequest>::from_request(req, payload);
        Box::pin(async move {
            let msgpack = kind.map_err(|why| refusal(StatusCode::UNSUPPORTED_MEDIA_TYPE, why))?;
            match tokio::time::timeout(timeout, read).await {
                Ok(bytes) => Ok(Body {
                    bytes: bytes?,
                    msgpack,
                }),
                // Dropping the unfinished read makes actix close the connection after this
                // answer, which frees its descriptor.
                Err(_) => Err(refusal(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} ms (http.body_timeout_ms)",
                        timeout.as_millis()
                    ),
                )),
            }
        })
    }
}

/// Whether a body of `req` is msgpack (`Ok(true)`), JSON (`Ok(false)`), or of a type no route
/// takes.
fn body_kind(req: &HttpRequest) -> Result<bool, String> {
    let Some(v) = req.headers().get(actix_web::http::header::CONTENT_TYPE) else {
        return Ok(false);
    };
    let t = v
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    let t = t.to_ascii_lowercase();
    match t.as_str() {
        MSGPACK | "application/x-msgpack" => Ok(true),
        "application/json" | "application/x-ndjson" | "application/jsonl" => Ok(false),
        _ if t.starts_with("application/") && t.ends_with("+json") => Ok(false),
        _ => Err(format!(
            "Content-Type {:?} is not accepted: send application/json, or application/msgpack \
             where a route takes it",
            v.to_str().unwrap_or("(not text)")
        )),
    }
}

fn refusal(status: StatusCode, why: String) -> actix_web::Error {
    actix_web::error::InternalError::from_response(why.clone(), error(status, &why)).into()
}

#[derive(Serialize)]
pub(crate) struct ErrorBody<'a> {
    pub(crate) error: &'a str,
}

pub(crate) fn error(status: StatusCode, why: &str) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody { error: why })
}

/// The content type of msgpack bodies.
pub(crate) const MSGPACK: &str = "application/msgpack";

/// The HTTP server span of a request (OpenTelemetry's HTTP conventions), continuing the
/// caller's `traceparent` and `tracestate` when they are well formed.
pub(crate) fn server_span(
    req: &HttpRequest,
    name: &'static str,
    route: &'static str,
) -> tracing::Span {
    use freshet_actors::telemetry;
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    let span = tracing::info_span!(target: telemetry::TARGET, "http.server",
        otel.name = name, otel.kind = "server", otel.status_code = tracing::field::Empty,
        http.request.method = %req.method(), http.route = route, url.path = req.path(),
        url.scheme = "http", user_agent.original = header("user-agent").unwrap_or(""),
        http.response.status_code = tracing::field::Empty);
    telemetry::continue_from(
        &span,
        &freshet_actors::envelope::TraceContext::from_headers(
            header("traceparent"),
            header("tracestate"),
        ),
    );
    span
}

/// Records the response's status on `span` (a 5xx is an error, as the conventions say) and
/// hands the span's context back in the response's `traceparent`.
pub(crate) fn end_server_span(span: &tracing::Span, response: &mut HttpResponse) {
    use actix_web::http::header::{HeaderName, HeaderValue};
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    let cx = freshet_actors::telemetry::context_of(span);
    let headers = [
        ("traceparent", cx.traceparent),
        ("tracestate", cx.tracestate),
    ];
    for (name, value) in headers {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), v);
        }
    }
}
