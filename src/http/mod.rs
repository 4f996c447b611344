//! The HTTP API: the serving routes ([`serving`]) that `freshet serve` and `freshet dev` share,
//! and the node routes ([`node`]: events and admin) that only a whole node has.
//!
//! Both kinds of server are built by [`bind`]: the serving state always, plus whatever routes
//! and state the caller adds. The serving routes know a node only through
//! [`serving::MetricsSource`], the lines it adds to `/metrics`.

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
    /// Predict requests scored at once: `--scoring-threads`, else twice the cores available.
    pub(crate) fn scoring_threads(&self) -> usize {
        self.scoring_threads.unwrap_or_else(|| {
            2 * std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// Binds the server's address, before anything else starts, so that a taken address is
/// refused before a command writes anything.
pub(crate) fn listen(http: &HttpArgs) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(&http.listen)
        .with_context(|| format!("listening on {}", http.listen))
}

/// Builds the HTTP server on `listener` over `state` with the serving routes, plus what `extra`
/// adds (a node's routes and their state); returns it, not yet running, and the addresses it
/// listens on. The connection bounds come from `[http]`; the connection cap is at most half of
/// the process's file-descriptor limit, which is raised to its hard limit first.
pub(crate) fn bind(
    state: web::Data<ServingState>,
    http: &HttpArgs,
    limits: &HttpSettings,
    listener: std::net::TcpListener,
    extra: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
) -> anyhow::Result<(actix_web::dev::Server, Vec<std::net::SocketAddr>)> {
    let max_connections = match crate::fdlimit::raise() {
        Ok(l) => {
            if let Some(from) = l.raised_from {
                tracing::info!(from, to = l.soft, "raised the open-file limit");
            }
            let cap = crate::fdlimit::connection_cap(limits.max_connections, l.soft);
            if cap < limits.max_connections {
                tracing::warn!(
                    configured = limits.max_connections,
                    cap,
                    open_file_limit = l.soft,
                    "http.max_connections is more than half the open-file limit; capped, so \
                     that the pipeline keeps the other half"
                );
            }
            cap
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            limits.max_connections
        }
    };
    let max_body = http.max_body_bytes;
    let body_timeout = BodyTimeout(Duration::from_millis(limits.body_timeout_ms));
    let workers = http.workers;
    let server = HttpServer::new(move || {
        let extra = extra.clone();
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .app_data(body_timeout)
            .configure(serving::routes)
            .configure(extra)
    })
    .workers(workers)
    // Per worker in actix; the total over workers is the cap.
    .max_connections(max_connections.div_ceil(workers).max(1))
    .client_request_timeout(Duration::from_millis(limits.header_timeout_ms))
    .keep_alive(Duration::from_millis(limits.keep_alive_ms))
    .disable_signals()
    .listen(listener)
    .with_context(|| format!("listening on {}", http.listen))?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
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
