//! `freshet bench tracing`: what trace export costs a live node.
//!
//! One run prepares a backlog (simulated events, joined into samples), then starts `freshet
//! dev` on a copy of it three ways: tracing off, exporting at the default sampler, and
//! exporting every trace (ratio 1.0). Each node trains on the backlog, so the trainer runs as
//! fast as it can: its samples/s is the training figure. Then closed-loop predict load gives
//! the p99, with the trainer still on the backlog. The configurations take turns, each round
//! starting with the next one, and the medians are compared with tracing off. Spans go to `--endpoint`, else to a sink on loopback in this process that
//! accepts every OTLP/HTTP post.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::node::Node;
use super::{cpu_model, median, print_report, progress};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct TracingBenchArgs {
    /// Impressions in the backlog (the simulator's, about 4% clicked).
    #[arg(long, default_value_t = 600_000)]
    impressions: u64,
    /// Seconds of training measured per node, after `--warmup-secs`.
    #[arg(long, default_value_t = 10)]
    train_secs: u64,
    #[arg(long, default_value_t = 4)]
    warmup_secs: u64,
    /// Seconds of predict load per node.
    #[arg(long, default_value_t = 8)]
    predict_secs: u64,
    /// Concurrent keep-alive connections of the predict load.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Candidates per predict request.
    #[arg(long, default_value_t = 50)]
    candidates: usize,
    /// Rounds of the three configurations; medians are reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// An OTLP/HTTP receiver's base URL (as `http://127.0.0.1:4318`); default: a sink on
    /// loopback in this process.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Print one JSON object instead of indented JSON.
    #[arg(long)]
    json: bool,
}

/// One way of running the node.
#[derive(Clone, Copy, Debug)]
struct Mode {
    name: &'static str,
    /// `OTEL_TRACES_SAMPLER_ARG`, when exporting at another ratio than the default.
    ratio: Option<&'static str>,
    exports: bool,
}

const MODES: [Mode; 3] = [
    Mode {
        name: "off",
        ratio: None,
        exports: false,
    },
    Mode {
        name: "default_sampler",
        ratio: None,
        exports: true,
    },
    Mode {
        name: "ratio_1",
        ratio: Some("1.0"),
        exports: true,
    },
];

#[derive(Debug, Default, Serialize)]
struct Run {
    samples_per_sec: f64,
    predict_p50_ms: f64,
    predict_p99_ms: f64,
    predict_requests: usize,
    predict_errors: u64,
    spans_exported: f64,
    spans_dropped: f64,
}

#[derive(Debug, Serialize)]
struct ModeReport {
    /// Medians over the rounds.
    samples_per_sec: f64,
    predict_p50_ms: f64,
    predict_p99_ms: f64,
    /// Against tracing off: samples/s (higher is better) and p99 (lower is better), the
    /// medians' ratios.
    samples_vs_off: f64,
    p99_vs_off: f64,
    /// The same ratios within each round (against that round's run with tracing off), and
    /// their medians: rounds drift as a whole, so these pairings are the steadier figure.
    samples_vs_off_by_round: Vec<f64>,
    p99_vs_off_by_round: Vec<f64>,
    samples_vs_off_paired: f64,
    p99_vs_off_paired: f64,
    runs: Vec<Run>,
}

#[derive(Debug, Serialize)]
struct TracingReport {
    cpu: String,
    impressions: u64,
    samples_in_backlog: u64,
    receiver: String,
    default_sampler: String,
    off: ModeReport,
    default_sampler_export: ModeReport,
    ratio_1_export: ModeReport,
    /// Whether the default sampler costs at most 3% of samples/s and of predict p99 (the
    /// paired medians).
    target_met: bool,
}

pub(crate) fn run(args: TracingBenchArgs, settings: &Settings) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let base = dir.path().join("base");
    let samples = prepare(&base, args.impressions)?;
    let (sink, endpoint) = match &args.endpoint {
        Some(e) => (None, e.clone()),
        None => {
            let sink = Sink::start()?;
            let at = format!("http://{}", sink.addr);
            (Some(sink), at)
        }
    };
    let window_ms = WINDOW_MS.to_string();
    let mut runs: Vec<Vec<Run>> = MODES.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds.max(1) {
        // Each round starts with the next configuration, so that none always runs first
        // (after the others' page cache, say).
        for k in 0..MODES.len() {
            let i = (k + round - 1) % MODES.len();
            let mode = &MODES[i];
            progress(&format!("round {round}: tracing {}", mode.name));
            let data = dir.path().join(format!("{}-{round}", mode.name));
            copy_dir(&base, &data)?;
            // The copy's dirty pages would otherwise be written back during the measurement.
            let _ = std::process::Command::new("sync").status();
            let r = measure(&args, mode, &data, &endpoint, &window_ms)?;
            progress(&format!(
                "  {:.0} samples/s, predict p99 {:.2} ms, {} spans exported",
                r.samples_per_sec, r.predict_p99_ms, r.spans_exported
            ));
            runs[i].push(r);
            std::fs::remove_dir_all(&data).ok();
        }
    }
    let off_runs: Vec<(f64, f64)> = runs
        .first()
        .map(|rs| {
            rs.iter()
                .map(|r| (r.samples_per_sec, r.predict_p99_ms))
                .collect()
        })
        .unwrap_or_default();
    let summarise = |runs: Vec<Run>| {
        let sps = median(&runs.iter().map(|r| r.samples_per_sec).collect::<Vec<_>>());
        let p50 = median(&runs.iter().map(|r| r.predict_p50_ms).collect::<Vec<_>>());
        let p99 = median(&runs.iter().map(|r| r.predict_p99_ms).collect::<Vec<_>>());
        let off_sps = median(&off_runs.iter().map(|r| r.0).collect::<Vec<_>>());
        let off_p99 = median(&off_runs.iter().map(|r| r.1).collect::<Vec<_>>());
        let by_round = |f: &dyn Fn(&Run, &(f64, f64)) -> f64| -> Vec<f64> {
            runs.iter().zip(&off_runs).map(|(r, o)| f(r, o)).collect()
        };
        let sps_by_round = by_round(&|r, o| r.samples_per_sec / o.0);
        let p99_by_round = by_round(&|r, o| r.predict_p99_ms / o.1);
        ModeReport {
            samples_per_sec: sps,
            predict_p50_ms: p50,
            predict_p99_ms: p99,
            samples_vs_off: sps / off_sps,
            p99_vs_off: p99 / off_p99,
            samples_vs_off_paired: median(&sps_by_round),
            p99_vs_off_paired: median(&p99_by_round),
            samples_vs_off_by_round: sps_by_round,
            p99_vs_off_by_round: p99_by_round,
            runs,
        }
    };
    let mut runs = runs.into_iter();
    let off = summarise(runs.next().unwrap_or_default());
    let default = summarise(runs.next().unwrap_or_default());
    let full = summarise(runs.next().unwrap_or_default());
    let report = TracingReport {
        cpu: cpu_model(),
        impressions: args.impressions,
        samples_in_backlog: samples,
        receiver: match &args.endpoint {
            Some(e) => e.clone(),
            None => "in-process sink on loopback (answers every post 200)".into(),
        },
        default_sampler: format!(
            "{} {}",
            settings.telemetry.sampler, settings.telemetry.sampler_arg
        ),
        target_met: default.samples_vs_off_paired >= 0.97 && default.p99_vs_off_paired <= 1.03,
        off,
        default_sampler_export: default,
        ratio_1_export: full,
    };
    drop(sink);
    print_report(&report, args.json)
}

/// The join window of the backlog and of the nodes that read it (`freshet dev`'s): the nodes'
/// joiners resume from the backlog's checkpoints, which only a window of the same length reads.
const WINDOW_MS: u64 = crate::settings::DEV_WINDOW_MS;

/// Simulated events joined into samples under `data`: the backlog every node trains on.
/// Returns the samples written.
fn prepare(data: &Path, impressions: u64) -> anyhow::Result<u64> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(&exe)
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env("FRESHET__JOINER__WINDOW__WINDOW_MS", WINDOW_MS.to_string())
            .output()
            .with_context(|| format!("running freshet {}", args.join(" ")))?;
        anyhow::ensure!(
            out.status.success(),
            "freshet {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    progress(&format!("simulating {impressions} impressions"));
    let n = impressions.to_string();
    run(&["simulate", "--fast", "--impressions", &n])?;
    progress("joining them into samples");
    let report = run(&["join", "--until-caught-up"])?;
    let v: serde_json::Value = report
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .context("freshet join printed no report")?;
    let samples = v["partitions"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["task"]["samples_written"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    anyhow::ensure!(samples > 0, "the backlog holds no sample: {v}");
    Ok(samples)
}

/// One node on `data`: its training rate over the backlog, then the predict latency.
fn measure(
    args: &TracingBenchArgs,
    mode: &Mode,
    data: &Path,
    endpoint: &str,
    window_ms: &str,
) -> anyhow::Result<Run> {
    let mut envs = Vec::new();
    if mode.exports {
        envs.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
    } else {
        // Off whatever a `[telemetry]` section says.
        envs.push(("OTEL_SDK_DISABLED", "true"));
    }
    if let Some(r) = mode.ratio {
        envs.push(("OTEL_TRACES_SAMPLER_ARG", r));
    }
    let log = data.with_extension("log");
    let mut node = Node::start_with(
        None,
        data,
        &log,
        &["--no-simulate", "--window-ms", window_ms],
        &envs,
    )?;
    let addr = node.wait_listening(Duration::from_secs(60))?;
    let rows = |addr: &str| -> anyhow::Result<(u64, Option<u64>)> {
        let st = get_json(addr, "/v1/admin/status")?;
        let t = &st["trainer"];
        Ok((t["rows_trained"].as_u64().unwrap_or(0), t["lag"].as_u64()))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while rows(&addr).map_or(0, |r| r.0) == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the node trained nothing within 120 s; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(args.warmup_secs));
    let (r0, t0) = (rows(&addr)?.0, Instant::now());
    std::thread::sleep(Duration::from_secs(args.train_secs));
    let (r1, lag) = rows(&addr)?;
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        lag.unwrap_or(1) > 0,
        "the node caught up with the backlog within the measured window, so the rate is the \
         backlog's, not the trainer's: give more --impressions"
    );
    let samples_per_sec = (r1 - r0) as f64 / secs;
    let sock: SocketAddr = addr.parse().context("the node's address")?;
    let bodies = Arc::new(super::serve::requests(64, args.candidates)?);
    let measure_from = Instant::now() + Duration::from_secs(1);
    let until = measure_from + Duration::from_secs(args.predict_secs);
    let clients: Vec<_> = (0..args.connections.max(1))
        .map(|c| {
            let bodies = bodies.clone();
            std::thread::spawn(move || super::serve::load(sock, bodies, c * 7, measure_from, until))
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for c in clients {
        let r = c
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        lat.extend(r.latencies_us);
        errors += r.errors;
    }
    lat.sort_unstable();
    let q = |f: f64| {
        lat.get(((lat.len().saturating_sub(1)) as f64 * f).round() as usize)
            .map_or(f64::NAN, |&us| f64::from(us) / 1e3)
    };
    let metrics = get_text(&addr, "/metrics")?;
    // The sum over a series' lines (its labels included): each line's value is its last field.
    let value = |series: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    };
    let run = Run {
        samples_per_sec,
        predict_p50_ms: q(0.5),
        predict_p99_ms: q(0.99),
        predict_requests: lat.len(),
        predict_errors: errors,
        spans_exported: value("freshet_trace_spans_exported_total "),
        spans_dropped: value("freshet_trace_spans_dropped_total{"),
    };
    node.stop(Duration::from_secs(20))?;
    Ok(run)
}

fn get_text(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut s =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no complete answer"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_owned())
}

fn get_json(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(&get_text(addr, path)?).with_context(|| format!("GET {path}: not JSON"))
}

/// Copies the directory tree `from` to `to`.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut todo: Vec<(PathBuf, PathBuf)> = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((src, dst)) = todo.pop() {
        std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
        for e in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
            let e = e?;
            let (s, d) = (e.path(), dst.join(e.file_name()));
            if e.file_type()?.is_dir() {
                todo.push((s, d));
            } else {
                std::fs::copy(&s, &d)
                    .with_context(|| format!("copying {} to {}", s.display(), d.display()))?;
            }
        }
    }
    Ok(())
}

/// An OTLP/HTTP sink on loopback: reads each post whole and answers 200 with an empty
/// export response, as a receiver that keeps up does.
struct Sink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    posts: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the span sink")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let posts = Arc::new(AtomicU64::new(0));
        let (st, p) = (stop.clone(), posts.clone());
        let thread = std::thread::Builder::new()
            .name("span-sink".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if answer(conn).is_ok() {
                                p.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .context("starting the span sink")?;
        Ok(Self {
            addr,
            stop,
            posts,
            thread: Some(thread),
        })
    }
}

/// Reads one request and answers it.
fn answer(conn: std::net::TcpStream) -> anyhow::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        anyhow::ensure!(r.read_line(&mut line)? > 0, "closed in its head");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let mut w = conn;
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\
          Connection: close\r\n\r\n",
    )?;
    Ok(())
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        progress(&format!(
            "the span sink took {} posts",
            self.posts.load(Ordering::Relaxed)
        ));
    }
}
