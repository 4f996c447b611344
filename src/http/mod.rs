//! The HTTP API: the serving routes ([`serving`]) that `freshet serve` and `freshet dev` share,
//! and the node routes ([`node`]: events and admin) that only a whole node has.
//!
//! Both kinds of server are built by [`bind`]: the serving state always, plus whatever routes
//! and state the caller adds. The serving routes know a node only through
//! [`serving::MetricsSource`], the lines it adds to `/metrics`.

pub(crate) mod node;
pub(crate) mod serving;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use clap::Args;
use serde::Serialize;

pub(crate) use serving::{Counters, ServingState};

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

/// Binds the HTTP server over `state` with the serving routes, plus what `extra` adds (a
/// node's routes and their state); returns it, not yet running, and the addresses it listens
/// on.
pub(crate) fn bind(
    state: web::Data<ServingState>,
    http: &HttpArgs,
    extra: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
) -> anyhow::Result<(actix_web::dev::Server, Vec<std::net::SocketAddr>)> {
    let max_body = http.max_body_bytes;
    let server = HttpServer::new(move || {
        let extra = extra.clone();
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .configure(serving::routes)
            .configure(extra)
    })
    .workers(http.workers)
    .disable_signals()
    .bind(&http.listen)
    .with_context(|| format!("listening on {}", http.listen))?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}

#[derive(Serialize)]
pub(crate) struct ErrorBody<'a> {
    pub(crate) error: &'a str,
}

pub(crate) fn error(status: StatusCode, why: &str) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody { error: why })
}

/// Whether `req` says its body is msgpack (JSON otherwise).
pub(crate) fn is_msgpack(req: &actix_web::HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(MSGPACK))
}

/// The content type of msgpack bodies.
pub(crate) const MSGPACK: &str = "application/msgpack";
