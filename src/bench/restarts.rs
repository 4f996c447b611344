//! `freshet bench restarts`: `freshet dev` killed with SIGKILL and started again on its data,
//! `--runs` times, and what validation and serving did in each run.
//!
//! Each run starts this binary as `freshet dev` on one temporary data directory (defaults, or
//! the bench's own `--config`), polls `GET /v1/admin/status` every `--every-ms` for `--secs`,
//! and kills the node. The report gives, per run, the validator's verdicts (passed, failed, the
//! reasons of the failures from the node's log, the range of the calibrations it saw) and the
//! serving lag: the newest version minus the version the replicas serve, at its largest. The
//! runs after the first start from a node that crashed, which is where the order of the
//! samples around a restart shows.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use super::node::Node;

#[derive(Debug, Args)]
pub(crate) struct RestartsArgs {
    /// Runs of the node: the first on an empty data directory, each later one after SIGKILL.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Seconds each run lasts once the node listens.
    #[arg(long, default_value_t = 70)]
    secs: u64,
    /// Milliseconds between two status polls.
    #[arg(long, default_value_t = 250)]
    every_ms: u64,
    /// Print one JSON object instead of an indented one.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Run {
    secs: f64,
    /// Whether the simulator continued the event log of the run before.
    continued_log: bool,
    passed: u64,
    failed: u64,
    /// `passed / (passed + failed)`; `None` before any verdict.
    pass_rate: Option<f64>,
    /// The failures as the node logged them: version and reason.
    failures: Vec<String>,
    /// Over the verdicts the polls saw (most of them: a verdict takes longer than a poll).
    calibration_min: Option<f64>,
    calibration_max: Option<f64>,
    verdicts_seen: u64,
    /// The newest version minus the version served, at its largest over the polls, and the
    /// same once a first version of this run had passed.
    max_lag_versions: u64,
    max_lag_versions_after_first_pass: Option<u64>,
    polls: u64,
    failed_polls: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    config_file: Option<std::path::PathBuf>,
    runs: Vec<Run>,
    /// Over the runs after a restart (the second on).
    restarted_pass_rate: Option<f64>,
    restarted_max_lag_versions: Option<u64>,
}

pub(crate) fn run(args: RestartsArgs, config: Option<&Path>) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(args.every_ms >= 10, "--every-ms must be at least 10");
    let dir = tempfile::tempdir().context("a temporary data directory")?;
    let data = dir.path().join("data");
    let log = dir.path().join("node.log");
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let mut node = Node::start(config, &data, &log)?;
        let addr = node.wait_listening(Duration::from_secs(120))?;
        super::progress(&format!(
            "run {}/{} (pid {}) on {addr} for {} s; the node's log is {}",
            i + 1,
            args.runs,
            node.pid(),
            args.secs,
            log.display()
        ));
        let run = watch(&mut node, &addr, &args)?;
        node.kill();
        super::progress(&format!(
            "  {} passed, {} failed, largest serving lag {} versions",
            run.passed, run.failed, run.max_lag_versions
        ));
        runs.push(run);
    }
    let restarted = &runs[1..];
    let (p, f) = restarted
        .iter()
        .fold((0, 0), |(p, f), r| (p + r.passed, f + r.failed));
    let report = Report {
        cpu: super::cpu_model(),
        config_file: config.map(Path::to_path_buf),
        restarted_pass_rate: (p + f > 0).then(|| p as f64 / (p + f) as f64),
        restarted_max_lag_versions: restarted.iter().map(|r| r.max_lag_versions).max(),
        runs,
    };
    super::print_report(&report, args.json)
}

/// Polls the node for `args.secs`, then reads its log.
fn watch(node: &mut Node, addr: &str, args: &RestartsArgs) -> anyhow::Result<Run> {
    let url = format!("http://{addr}");
    let started = Instant::now();
    let mut run = Run::default();
    let mut last_seen = None;
    let mut passed_once = false;
    while started.elapsed() < Duration::from_secs(args.secs) {
        if let Some(status) = node.exited()? {
            anyhow::bail!("the node exited during its run ({status})");
        }
        run.polls += 1;
        let answer = crate::ctl::request(
            &url,
            "GET",
            "/v1/admin/status",
            None,
            None,
            Duration::from_secs(10),
        );
        match answer {
            Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                Ok(st) => observe(&st, &mut run, &mut last_seen, &mut passed_once),
                Err(_) => run.failed_polls += 1,
            },
            _ => run.failed_polls += 1,
        }
        std::thread::sleep(Duration::from_millis(args.every_ms));
    }
    run.secs = started.elapsed().as_secs_f64();
    let output = node.output()?;
    run.continued_log = output.contains("the simulator continues the event log");
    run.failures = failures(&output);
    let verdicts = run.passed + run.failed;
    run.pass_rate = (verdicts > 0).then(|| run.passed as f64 / verdicts as f64);
    Ok(run)
}

/// Takes one status answer into `run`.
fn observe(st: &Value, run: &mut Run, last_seen: &mut Option<u64>, passed_once: &mut bool) {
    let v = &st["validator"];
    if let (Some(p), Some(f)) = (v["passed"].as_u64(), v["failed"].as_u64()) {
        run.passed = p;
        run.failed = f;
        *passed_once |= p > 0;
    }
    // `last_verdict` is `[version, validation]`.
    let verdict = &v["last_verdict"];
    if let Some(version) = verdict[0].as_u64() {
        if *last_seen != Some(version) {
            *last_seen = Some(version);
            run.verdicts_seen += 1;
            if let Some(c) = verdict[1]["metrics"]["calibration"].as_f64() {
                run.calibration_min = Some(run.calibration_min.map_or(c, |m| m.min(c)));
                run.calibration_max = Some(run.calibration_max.map_or(c, |m| m.max(c)));
            }
        }
    }
    let served = st["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["version"].as_u64())
        .min();
    if let (Some(newest), Some(served)) = (st["latest_version"].as_u64(), served) {
        let lag = newest.saturating_sub(served);
        run.max_lag_versions = run.max_lag_versions.max(lag);
        if *passed_once {
            run.max_lag_versions_after_first_pass = Some(
                run.max_lag_versions_after_first_pass
                    .map_or(lag, |m| m.max(lag)),
            );
        }
    }
}

/// The validator's failure lines (`version failed validation version=V reason=...`), from
/// `version=` on.
fn failures(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("version failed validation"))
        .map(|l| {
            let from = l.find("version=").unwrap_or(0);
            l[from..].to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_answer_counts_verdicts_calibrations_and_the_serving_lag() {
        let mut run = Run::default();
        let (mut last, mut once) = (None, false);
        let st = |passed: u64, verdict: Value, latest: u64, served: &[u64]| {
            serde_json::json!({
                "validator": {"passed": passed, "failed": 1, "last_verdict": verdict},
                "latest_version": latest,
                "replicas": served.iter().map(|v| serde_json::json!({"version": v})).collect::<Vec<_>>(),
            })
        };
        let verdict = |v: u64, c: f64| serde_json::json!([v, {"metrics": {"calibration": c}}]);
        observe(&st(0, Value::Null, 9, &[2]), &mut run, &mut last, &mut once);
        assert_eq!((run.max_lag_versions, run.verdicts_seen), (7, 0));
        assert_eq!(run.max_lag_versions_after_first_pass, None);
        observe(
            &st(1, verdict(5, 1.2), 10, &[8, 9]),
            &mut run,
            &mut last,
            &mut once,
        );
        // The same verdict seen twice counts once.
        observe(
            &st(1, verdict(5, 1.2), 11, &[11]),
            &mut run,
            &mut last,
            &mut once,
        );
        observe(
            &st(2, verdict(7, 0.8), 12, &[12]),
            &mut run,
            &mut last,
            &mut once,
        );
        assert_eq!((run.passed, run.failed, run.verdicts_seen), (2, 1, 2));
        assert_eq!(
            (run.calibration_min, run.calibration_max),
            (Some(0.8), Some(1.2))
        );
        assert_eq!(run.max_lag_versions, 7);
        assert_eq!(run.max_lag_versions_after_first_pass, Some(2));
        // Malformed answers change nothing.
        observe(
            &serde_json::json!({"validator": 3}),
            &mut run,
            &mut last,
            &mut once,
        );
        observe(&serde_json::json!([1, 2]), &mut run, &mut last, &mut once);
        assert_eq!(
            (run.passed, run.verdicts_seen, run.max_lag_versions),
            (2, 2, 7)
        );
        let log = "noise\n2026 WARN freshet: version failed validation version=4 reason=x y\n";
        assert_eq!(failures(log), vec!["version=4 reason=x y".to_owned()]);
    }
}
