//! `freshet bench serve`: closed-loop load on `POST /v1/predict`, against the dense forward
//! pass's FLOP limit measured in the same run.
//!
//! 1. A node runs as `freshet dev` does, in a temporary data directory, while the simulator
//!    plays live for `--train-secs`, so the model served is the one `freshet dev` serves, with
//!    learned rows for the keys requests carry. The node then stops; its serving cell keeps the
//!    last published version, and nothing trains while the load runs.
//! 2. The limit: the sgemm peak of this binary on `--threads` cores (the best of the model's own
//!    layer shapes at `--candidates` rows and a large square), divided by the forward FLOPs of
//!    one candidate (`2 * Σ in * out` over the dense layers). No server can score more items
//!    per second than that on these cores.
//! 3. The load: `--connections` keep-alive connections, each sending a msgpack request with
//!    `--candidates` candidates as soon as the previous answer is in (closed loop), for
//!    `--secs` after `--warmup-secs`. The load generator runs on the same cores as the server,
//!    so the figure is conservative.
//! 4. Overload (`--overload-connections N`, 256 by default; 0 skips it): N connections send
//!    the same requests in a closed loop for `--overload-secs`, far past what the server admits
//!    (`--max-in-flight`). Meanwhile two probes open a new connection every 100 ms for `GET
//!    /healthz`, one on the operations port and one on the port the burst loads, and another
//!    sends one-candidate predictions on its own connection. The report has the shed rate, the
//!    probes' latencies, the admitted requests' p99, and the process's RSS before the burst,
//!    at its peak, and `--settle-secs` after it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use anyhow::Context;
use clap::Args;
use freshet_actors::dense::{gemm::sgemm_peak, Threads};
use freshet_actors::event::Event;
use freshet_actors::online::pipeline::PipelineHandle;
use freshet_actors::serving::ReplicaSet;
use freshet_actors::serving::{Candidate, ModelCell, PredictRequest};
use freshet_actors::simulate::{play_live, SimConfig, Simulator};
use freshet_actors::stream::now_ms;
use serde::Serialize;

use crate::http::{Counters, HttpArgs, ServingState};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct ServeBenchArgs {
    /// Candidates per predict request.
    #[arg(long, default_value_t = 100)]
    candidates: usize,
    /// Concurrent keep-alive connections (each waits for its answer before the next request).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Seconds the pipeline trains on simulated traffic before the load.
    #[arg(long, default_value_t = 12)]
    train_secs: u64,
    /// HTTP worker threads of the server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Cores the FLOP limit is measured on (the machine's scoring capacity).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The server's scoring threads (default: the cores available, as `freshet serve`).
    #[arg(long)]
    scoring_threads: Option<usize>,
    /// Predict requests the server admits at once; more are shed with 503.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Connections of the overload burst (0: no burst).
    #[arg(long, default_value_t = 256)]
    overload_connections: usize,
    #[arg(long, default_value_t = 15)]
    overload_secs: u64,
    /// Seconds after the burst before the last RSS reading.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct ServeReport {
    model: String,
    version: u64,
    rows: usize,
    candidates: usize,
    connections: usize,
    requests: u64,
    /// Answers other than 200 (503s included): none is expected in a closed loop.
    errors: u64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_mean_ms: f64,
    requests_per_sec: f64,
    items_per_sec: f64,
    forward_flops_per_item: f64,
    sgemm_peak_gflops: f64,
    sgemm_shapes: Vec<(usize, usize, usize, f64)>,
    /// `sgemm_peak / forward_flops_per_item`: items/s if every cycle were dense GEMM.
    forward_limit_items_per_sec: f64,
    vs_forward_limit: f64,
    scoring_threads: usize,
    max_in_flight: usize,
    overload: Option<OverloadReport>,
}

/// What a burst far past the admission limit did.
#[derive(Debug, Serialize)]
struct OverloadReport {
    connections: usize,
    secs: u64,
    requests: u64,
    shed: u64,
    /// 503s among the burst's answers.
    shed_rate: f64,
    /// Other failures: refused connections, timeouts, other statuses.
    errors: u64,
    admitted_p50_ms: f64,
    admitted_p99_ms: f64,
    /// `GET /healthz` on the operations port, on a fresh connection every 100 ms during the
    /// burst.
    healthz: Probe,
    /// The same on the main port, which the burst loads.
    healthz_main_port: Probe,
    /// One-candidate predictions on their own connection during the burst, answered 200 or 503.
    small_predict_probes: usize,
    small_predict_p99_ms: f64,
    small_predict_shed: u64,
    rss_before_mb: f64,
    rss_peak_mb: f64,
    rss_after_mb: f64,
    /// `rss_after / rss_before`: target at most 1.2.
    rss_after_vs_before: f64,
}

/// Latencies of `GET /healthz` on fresh connections.
#[derive(Debug, Serialize)]
struct Probe {
    probes: usize,
    /// Probes that got no 200 within 10 s.
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Probes `GET /healthz` on `addr` every 100 ms until `stop`.
fn probe_healthz(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Probe> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (Vec::new(), 0usize);
        while !stop.load(Ordering::Relaxed) {
            match healthz_once(addr) {
                Some(d) => ok.push(d),
                None => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ok.sort_unstable();
        Probe {
            probes: ok.len() + failed,
            failed,
            p50_ms: quantile_ms(&ok, 0.5),
            p99_ms: quantile_ms(&ok, 0.99),
            max_ms: quantile_ms(&ok, 1.0),
        }
    })
}

pub(crate) fn run(args: ServeBenchArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.candidates >= 1 && args.connections >= 1 && args.workers >= 1,
        "--candidates, --connections and --workers must be at least 1"
    );
    anyhow::ensure!(args.secs >= 1, "--secs must be at least 1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(bench(args, settings))
}

fn progress(msg: &str) {
    eprintln!("bench serve: {msg}");
}

/// Trains the `freshet dev` pipeline on simulated traffic; returns the cell of its replica,
/// holding the last version it served.
async fn train_a_model(
    settings: &Settings,
    dir: &std::path::Path,
    secs: u64,
) -> anyhow::Result<Arc<ModelCell>> {
    let mut s = settings.clone();
    s.node.data_dir = dir.to_path_buf();
    // Any version will do for a serving bench: a quick, loose gate publishes early.
    s.validation.min_samples = 500;
    s.validation.max_auc_drop = 1.0;
    s.validation.max_logloss_ratio = 100.0;
    s.validation.max_calibration_error = 100.0;
    let cfg = crate::settings::pipeline_config(&s, 2_000, 1_000, 1)?;
    let events = cfg.logs.events.clone();
    let (pipe, _join) = PipelineHandle::start(cfg).await?;
    let cell = pipe.cells()[0].clone();
    progress(&format!(
        "training the dev pipeline on simulated traffic for {secs} s"
    ));
    // The simulator plays into the event log as `freshet dev` does, for `secs`.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut sim = Simulator::new(SimConfig {
                seed: 7,
                rate: 5_000.0,
                start_ms: now_ms(),
                click_delay_median_ms: 300.0,
                ..SimConfig::default()
            })?;
            Ok(play_live(&mut sim, events.as_ref(), &stop)?)
        })
    };
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let appended = tokio::task::spawn_blocking(move || producer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the event producer panicked"))??;
    // Let training catch up so the served version has seen most of the traffic.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let idle = pipe.trainer_status().await.is_ok_and(|t| t.lag == Some(0));
        if idle && cell.version().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pipe.shutdown().await?;
    anyhow::ensure!(
        cell.version().is_some(),
        "no version was served after {appended} events; train longer (--train-secs)"
    );
    Ok(cell)
}

/// `n` requests of `candidates` candidates each, as msgpack: the first impression's user and
/// context features shared, each candidate's item its own (the simulator's traffic, so keys
/// hit learned rows as real requests would).
pub(super) fn requests(n: usize, candidates: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut sim = Simulator::new(SimConfig {
        seed: 11,
        items_per_request: candidates as u32,
        start_ms: now_ms(),
        duplicate_rate: 0.0,
        out_of_order_rate: 0.0,
        malformed_rate: 0.0,
        ..SimConfig::default()
    })?;
    let (mut recs, mut truth) = (Vec::new(), Vec::new());
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        sim.next_request(&mut recs, &mut truth);
        truth.clear();
        let mut req = PredictRequest::default();
        for r in recs.drain(..) {
            let Ok(Event::Impression(imp)) = Event::from_msgpack(&r.payload) else {
                continue;
            };
            let mut f = imp.features.decode()?;
            if req.candidates.is_empty() {
                req.dense = std::mem::take(&mut f.dense);
                req.sparse = f.sparse.clone();
                req.sparse.remove("C2");
            }
            let mut c = Candidate::default();
            if let Some(item) = f.sparse.remove("C2") {
                c.sparse.insert("C2".into(), item);
            }
            req.candidates.push(c);
            if req.candidates.len() == candidates {
                break;
            }
        }
        if req.candidates.len() == candidates {
            out.push(rmp_serde::to_vec_named(&req)?);
        }
    }
    Ok(out)
}

/// What bounds scoring on these cores.
struct Limit {
    model: String,
    forward_flops_per_item: f64,
    peak_gflops: f64,
    /// (m, n, k, GFLOP/s) of each sgemm shape measured.
    shapes: Vec<(usize, usize, usize, f64)>,
}

/// The dense forward pass's FLOPs per item and the sgemm peak on `threads` cores.
fn forward_limit(cell: &ModelCell, candidates: usize, threads: usize) -> anyhow::Result<Limit> {
    let model = cell.current().context("no model is served")?;
    let net = model.weights().net()?;
    // `flops_per_sample` counts a training step, forward 2 and backward 4 per multiply-add.
    let forward = net.flops_per_sample() / 3.0;
    let th = Threads::new(threads)?;
    let mut dims = vec![net.shape().input_dim()];
    dims.extend(net.config().hidden());
    let mut shapes: Vec<(usize, usize, usize)> = vec![(2048, 2048, 2048)];
    shapes.extend(dims.windows(2).map(|w| (candidates, w[1], w[0])));
    let measured: Vec<(usize, usize, usize, f64)> = shapes
        .into_iter()
        .map(|(m, n, k)| (m, n, k, sgemm_peak(&th, m, n, k, 1.0) / 1e9))
        .collect();
    let peak = measured.iter().map(|s| s.3).fold(0.0, f64::max);
    Ok(Limit {
        model: net.config().kind.name().to_string(),
        forward_flops_per_item: forward,
        peak_gflops: peak,
        shapes: measured,
    })
}

/// One keep-alive HTTP/1.1 connection that posts msgpack predict requests.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    head: Vec<u8>,
    line: String,
    body: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            head: Vec::new(),
            line: String::new(),
            body: Vec::new(),
        })
    }

    /// Posts one request; returns the status.
    fn predict(&mut self, body: &[u8]) -> anyhow::Result<u16> {
        self.head.clear();
        write!(
            self.head,
            "POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/msgpack\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )?;
        self.head.extend_from_slice(body);
        self.writer.write_all(&self.head)?;
        self.line.clear();
        self.reader.read_line(&mut self.line)?;
        let status: u16 = self
            .line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {:?}", self.line))?;
        let mut len = None;
        loop {
            self.line.clear();
            anyhow::ensure!(
                self.reader.read_line(&mut self.line)? > 0,
                "the server closed the connection"
            );
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let len = len.context("an answer without Content-Length")?;
        self.body.resize(len, 0);
        self.reader.read_exact(&mut self.body)?;
        Ok(status)
    }
}

pub(super) struct LoadResult {
    pub(super) latencies_us: Vec<u32>,
    pub(super) errors: u64,
}

pub(super) fn load(
    addr: SocketAddr,
    bodies: Arc<Vec<Vec<u8>>>,
    offset: usize,
    measure_from: Instant,
    until: Instant,
) -> anyhow::Result<LoadResult> {
    let mut conn = Conn::open(addr)?;
    let mut r = LoadResult {
        latencies_us: Vec::new(),
        errors: 0,
    };
    let mut i = offset;
    loop {
        let t = Instant::now();
        if t >= until {
            return Ok(r);
        }
        let status = conn.predict(&bodies[i % bodies.len()])?;
        i += 1;
        if t >= measure_from {
            if status == 200 {
                r.latencies_us.push(t.elapsed().as_micros() as u32);
            } else {
                r.errors += 1;
            }
        }
    }
}

/// This process's resident set, in MB (`VmRSS` of `/proc/self/status`).
fn rss_mb() -> anyhow::Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kb / 1024.0)
}

/// `GET /healthz` on a new connection: its latency, when it answered 200 within 10 s.
fn healthz_once(addr: SocketAddr) -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut first = [0u8; 12];
    s.read_exact(&mut first).ok()?;
    (&first == b"HTTP/1.1 200").then(|| t.elapsed())
}

/// Nearest-rank quantile of sorted latencies, in ms.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3
}

/// The burst of `--overload-connections`, with the probes and the RSS readings.
fn overload(
    addr: SocketAddr,
    ops: SocketAddr,
    bodies: Arc<Vec<Vec<u8>>>,
    small: Vec<u8>,
    args: &ServeBenchArgs,
) -> anyhow::Result<OverloadReport> {
    let rss_before_mb = rss_mb()?;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0f64;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss_mb().unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let healthz = probe_healthz(ops, stop.clone());
    let healthz_main = probe_healthz(addr, stop.clone());
    let small_probe = {
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, u64)> {
            let mut conn = Conn::open(addr)?;
            let (mut lat, mut shed) = (Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match conn.predict(&small)? {
                    200 => lat.push(t.elapsed()),
                    503 => {
                        shed += 1;
                        lat.push(t.elapsed());
                    }
                    other => anyhow::bail!("a one-candidate predict answered {other}"),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok((lat, shed))
        })
    };
    let until = Instant::now() + Duration::from_secs(args.overload_secs);
    let burst: Vec<_> = (0..args.overload_connections)
        .map(|c| {
            let bodies = bodies.clone();
            std::thread::spawn(move || {
                let (mut lat, mut shed, mut errors) = (Vec::new(), 0u64, 0u64);
                let Ok(mut conn) = Conn::open(addr) else {
                    return (lat, shed, 1);
                };
                let mut i = c * 7;
                while Instant::now() < until {
                    let t = Instant::now();
                    match conn.predict(&bodies[i % bodies.len()]) {
                        Ok(200) => lat.push(t.elapsed()),
                        Ok(503) => shed += 1,
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            match Conn::open(addr) {
                                Ok(c) => conn = c,
                                Err(_) => break,
                            }
                        }
                    }
                    i += 1;
                }
                (lat, shed, errors)
            })
        })
        .collect();
    let (mut admitted, mut shed, mut errors) = (Vec::new(), 0, 0);
    for t in burst {
        let (l, s, e) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a burst thread panicked"))?;
        admitted.extend(l);
        shed += s;
        errors += e;
    }
    stop.store(true, Ordering::Relaxed);
    let rss_peak_mb = peak
        .join()
        .map_err(|_| anyhow::anyhow!("the RSS thread panicked"))?;
    let healthz = healthz
        .join()
        .map_err(|_| anyhow::anyhow!("the healthz probe panicked"))?;
    let healthz_main_port = healthz_main
        .join()
        .map_err(|_| anyhow::anyhow!("the healthz probe panicked"))?;
    let (mut sp, small_predict_shed) = small_probe
        .join()
        .map_err(|_| anyhow::anyhow!("the predict probe panicked"))??;
    progress(&format!(
        "burst over; waiting {} s for the last RSS reading",
        args.settle_secs
    ));
    std::thread::sleep(Duration::from_secs(args.settle_secs));
    let rss_after_mb = rss_mb()?;
    admitted.sort_unstable();
    sp.sort_unstable();
    let requests = admitted.len() as u64 + shed + errors;
    Ok(OverloadReport {
        connections: args.overload_connections,
        secs: args.overload_secs,
        requests,
        shed,
        shed_rate: shed as f64 / requests.max(1) as f64,
        errors,
        admitted_p50_ms: quantile_ms(&admitted, 0.5),
        admitted_p99_ms: quantile_ms(&admitted, 0.99),
        healthz,
        healthz_main_port,
        small_predict_probes: sp.len(),
        small_predict_p99_ms: quantile_ms(&sp, 0.99),
        small_predict_shed,
        rss_before_mb,
        rss_peak_mb,
        rss_after_mb,
        rss_after_vs_before: rss_after_mb / rss_before_mb,
    })
}

async fn bench(args: ServeBenchArgs, settings: &Settings) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("a temporary data directory")?;
    let cell = train_a_model(settings, dir.path(), args.train_secs).await?;
    let model = cell.current().context("no model is served")?;
    let (version, rows) = (model.version(), model.rows());
    progress(&format!(
        "serving version {version} with {rows} rows; measuring the sgemm peak"
    ));
    let limit = {
        let (cell, c, t) = (cell.clone(), args.candidates, args.threads);
        tokio::task::spawn_blocking(move || forward_limit(&cell, c, t)).await??
    };
    let bodies = Arc::new(requests(64, args.candidates)?);

    let store = freshet_actors::ckpt::ModelStore::open_existing(dir.path().join("models"))?;
    let http = HttpArgs {
        listen: "127.0.0.1:0".into(),
        max_candidates: args.candidates.max(1000),
        max_body_bytes: 4 << 20,
        max_in_flight: args.max_in_flight,
        scoring_threads: args.scoring_threads,
        workers: args.workers,
        ops_listen: None,
    };
    let state = web::Data::new(ServingState {
        store,
        cell,
        replicas: ReplicaSet::with_len(0),
        max_candidates: http.max_candidates,
        max_in_flight: http.max_in_flight,
        scoring: tokio::sync::Semaphore::new(http.scoring_threads()),
        counters: Counters::default(),
        metrics: Vec::new(),
        stopped: Default::default(),
        following: None,
    });
    let listeners = crate::http::listen(&http)?;
    let servers = crate::http::bind(state, &http, &settings.http, listeners, |_, _| {})?;
    let addr = *servers
        .addrs
        .first()
        .context("the server listens nowhere")?;
    let ops = *servers
        .ops_addrs
        .first()
        .context("the server has no operations port")?;
    let running = servers.spawn();
    progress(&format!(
        "{} connections, {} candidates per request, {} s after {} s of warm-up",
        args.connections, args.candidates, args.secs, args.warmup_secs
    ));
    let measure_from = Instant::now() + Duration::from_secs(args.warmup_secs);
    let until = measure_from + Duration::from_secs(args.secs);
    let clients: Vec<_> = (0..args.connections)
        .map(|c| {
            let bodies = bodies.clone();
            std::thread::spawn(move || load(addr, bodies, c * 7, measure_from, until))
        })
        .collect();
    let results = tokio::task::spawn_blocking(move || {
        clients
            .into_iter()
            .map(|c| {
                c.join()
                    .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<LoadResult>>>()
    })
    .await??;
    let overload = if args.overload_connections > 0 {
        progress(&format!(
            "overload: {} connections for {} s",
            args.overload_connections, args.overload_secs
        ));
        let small = requests(1, 1)?.remove(0);
        let (bodies, args) = (bodies.clone(), &args);
        Some(tokio::task::block_in_place(|| {
            overload(addr, ops, bodies, small, args)
        })?)
    } else {
        None
    };
    running.stop().await?;

    let mut lat: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    anyhow::ensure!(!lat.is_empty(), "no request was answered with 200");
    lat.sort_unstable();
    let q = |f: f64| lat[((lat.len() - 1) as f64 * f).round() as usize] as f64 / 1000.0;
    let secs = args.secs as f64;
    let items_per_sec = lat.len() as f64 * args.candidates as f64 / secs;
    let max_items = limit.peak_gflops * 1e9 / limit.forward_flops_per_item;
    let report = ServeReport {
        model: limit.model,
        version,
        rows,
        candidates: args.candidates,
        connections: args.connections,
        requests: lat.len() as u64,
        errors,
        latency_p50_ms: q(0.5),
        latency_p99_ms: q(0.99),
        latency_mean_ms: lat.iter().map(|&l| l as f64).sum::<f64>() / lat.len() as f64 / 1000.0,
        requests_per_sec: lat.len() as f64 / secs,
        items_per_sec,
        forward_flops_per_item: limit.forward_flops_per_item,
        sgemm_peak_gflops: limit.peak_gflops,
        sgemm_shapes: limit.shapes,
        forward_limit_items_per_sec: max_items,
        vs_forward_limit: items_per_sec / max_items,
        scoring_threads: http.scoring_threads(),
        max_in_flight: http.max_in_flight,
        overload,
    };
    super::print_report(&report, args.json)
}
