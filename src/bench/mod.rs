//! `freshet bench`: hot paths measured against a baseline in the same run.
//!
//! Absolute times drift on shared machines, so every figure comes with its baseline from the
//! same process, and the ratios are the figures that matter. Each bench is a file of its own;
//! this module only dispatches.

mod checkpoint;
mod cluster;
mod dense;
mod disk;
mod embedding;
mod freshness;
mod join;
mod node;
mod online;
mod restarts;
mod serve;
mod trace_cost;

use clap::Subcommand;

use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// The embedding table against an ahash HashMap and a memory-limit probe.
    Embedding(embedding::EmbeddingArgs),
    /// The dense training step's FLOP/s against this binary's sgemm peak on the same threads.
    Dense(dense::DenseArgs),
    /// The SampleJoiner end to end through the embedded log: impressions/s and click-to-sample
    /// latency, against the raw log in the same run.
    Join(join::JoinBenchArgs),
    /// The model store: delta size against the changed rows, delta write time, and full
    /// restore against the disk's sequential read, in one run.
    Checkpoint(checkpoint::CheckpointBenchArgs),
    /// Time from a click being appended to serving answering with a version that learned
    /// from it, with the whole pipeline running live.
    Freshness(freshness::FreshnessArgs),
    /// What online learning buys on a time-ordered stream: the progressive AUC of static,
    /// daily-batch and online training (through a live node, at several event rates) and of a
    /// zero-lag learner, with the serving lag in samples and in milliseconds.
    Online(online::OnlineArgs),
    /// Closed-loop load on POST /v1/predict: latency and items scored/s, against the dense
    /// forward pass's FLOP limit on the same cores.
    Serve(serve::ServeBenchArgs),
    /// The disk `freshet dev` takes on its defaults: every part of its data directory over a
    /// run (10 minutes by default), carried to 24 hours.
    Disk(disk::DiskBenchArgs),
    /// `freshet dev` killed with SIGKILL and started again on its data, several times: the
    /// validation verdicts of each run (passed, failed, calibrations) and how far serving
    /// fell behind the newest version.
    Restarts(restarts::RestartsArgs),
    /// Offline training with the shards in process, on one other node process and on two,
    /// on loopback: samples/s, their ratio to in-process, and bytes per sample against the
    /// floats that must move.
    Cluster(cluster::ClusterBenchArgs),
    /// Trace export on a live node: training samples/s and predict p99 with tracing off, at
    /// the default sampler and at ratio 1.0, in one run.
    Tracing(trace_cost::TracingBenchArgs),
}

/// `config`: the configuration file given with `--config`, for a bench that starts a node.
pub(crate) fn run(
    cmd: BenchCommand,
    settings: &Settings,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Embedding(a) => embedding::run(a, settings),
        BenchCommand::Dense(a) => dense::run(a),
        BenchCommand::Join(a) => join::run(a, settings),
        BenchCommand::Checkpoint(a) => checkpoint::run(a, settings),
        BenchCommand::Freshness(a) => freshness::run(a, settings),
        BenchCommand::Online(a) => online::run(a, settings),
        BenchCommand::Serve(a) => serve::run(a, settings),
        BenchCommand::Disk(a) => disk::run(a, settings, config),
        BenchCommand::Restarts(a) => restarts::run(a, config),
        BenchCommand::Cluster(a) => cluster::run(a, settings),
        BenchCommand::Tracing(a) => trace_cost::run(a, settings),
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `f` quantile (0 to 1) of `sorted`, the element nearest its rank; `None` when empty.
pub(super) fn quantile<T: Copy>(sorted: &[T], f: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get((last as f64 * f).round() as usize).copied()
}

pub(super) fn best(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(0.0, f64::max)
}

/// Prints a bench's report on stdout: one line of JSON with `--json`, else indented.
pub(super) fn print_report(report: &impl serde::Serialize, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

pub(super) fn progress(msg: &str) {
    eprintln!("{msg}");
}

/// The CPU the figures were measured on, from `/proc/cpuinfo` (`unknown` elsewhere).
pub(super) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
