//! `freshet bench disk`: the disk `freshet dev` takes on its defaults, measured over a run and
//! extrapolated to a day.
//!
//! The bench starts this binary as `freshet dev` (defaults or the bench's own `--config`, its
//! simulator, a temporary data directory), measures every part of the data directory every
//! `--every-secs`, and stops the node with SIGINT after `--secs`. Each part is either bounded
//! by a setting (a partition of the log by `log.retention_bytes` plus a segment, the model
//! store by `checkpoint.keep_bytes`) or not. The day's figure for a part is its size at the end
//! plus its growth over the second half of the run, carried to 24 hours, and for a part that
//! stayed within its bound no more than the bound (one that went past it is carried as
//! unbounded). The growth of a bounded part in a short run says whether the bound is reached:
//! the report shows both, and the peak each part reached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::node::Node;
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct DiskBenchArgs {
    /// Seconds the node runs.
    #[arg(long, default_value_t = 600)]
    secs: u64,
    /// Seconds between two measurements.
    #[arg(long, default_value_t = 10)]
    every_secs: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Part {
    name: String,
    /// What bounds it, in bytes; `None`: nothing does.
    bound_bytes: Option<u64>,
    end_bytes: u64,
    peak_bytes: u64,
    /// Least-squares growth over the second half of the run.
    growth_bytes_per_sec: f64,
    day_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    secs: f64,
    events_appended: Option<u64>,
    /// The configuration the node ran with: the file given with `--config` (passed on to
    /// it), whether `./freshet.toml` (which it reads without one) exists, and the
    /// `FRESHET__*` overrides.
    config_file: Option<PathBuf>,
    default_config_present: bool,
    overrides: Vec<String>,
    parts: Vec<Part>,
    end_bytes: u64,
    peak_bytes: u64,
    day_bytes: u64,
}

pub(crate) fn run(
    args: DiskBenchArgs,
    settings: &Settings,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.every_secs >= 1 && args.secs >= 4 * args.every_secs,
        "--secs must hold at least four measurements of --every-secs"
    );
    let dir = tempfile::tempdir().context("a temporary data directory")?;
    let data = dir.path().join("data");
    let log = dir.path().join("node.log");
    let mut node = Node::start(config, &data, &log)?;
    super::progress(&format!(
        "freshet dev (pid {}) in {} for {} s; its log is {}",
        node.pid(),
        data.display(),
        args.secs,
        log.display()
    ));
    let started = Instant::now();
    let mut samples: Vec<(f64, BTreeMap<String, u64>)> = Vec::new();
    let every = Duration::from_secs(args.every_secs);
    let mut next = started;
    let outcome = loop {
        if let Some(status) = node.exited()? {
            break Err(anyhow::anyhow!(
                "the node exited early ({status}); see {}",
                log.display()
            ));
        }
        let now = Instant::now();
        if now >= next {
            let t = now.duration_since(started).as_secs_f64();
            let sizes = measure(&data)?;
            let total: u64 = sizes.values().sum();
            super::progress(&format!(
                "  {t:>5.0} s: {:.1} MB in {} parts",
                total as f64 / 1e6,
                sizes.len()
            ));
            samples.push((t, sizes));
            if t >= args.secs as f64 {
                break Ok(());
            }
            next += every;
        }
        std::thread::sleep(Duration::from_millis(200).min(next.saturating_duration_since(now)));
    };
    outcome?;
    node.stop(Duration::from_secs(60))?;
    let node_log = std::fs::read_to_string(&log).unwrap_or_default();
    let events_appended = node_log
        .lines()
        .find_map(|l| l.strip_prefix("the simulator appended "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    let mut report = report(settings, &samples, events_appended)?;
    report.config_file = config.map(Path::to_path_buf);
    super::print_report(&report, args.json)
}

/// Bytes of each part of a node's data directory: each topic of the log, the model store, the
/// joiner's checkpoints, and the rest.
fn measure(data: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(data) else {
        return Ok(out);
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "log" {
            for t in std::fs::read_dir(e.path())? {
                let t = t?;
                out.insert(
                    format!("log/{}", t.file_name().to_string_lossy()),
                    du(&t.path()),
                );
            }
        } else {
            out.insert(name, du(&e.path()));
        }
    }
    Ok(out)
}

/// Bytes of the files under `p`. Files vanish while the node runs (retention, renames), so
/// an entry gone between listing and reading counts as nothing.
fn du(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![p.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else {
            total += md.len();
        }
    }
    total
}

/// What bounds a part: a topic's partitions by retention plus one segment each (a hold can
/// keep more, and the report would then show growth), the model store by `keep_bytes`.
fn bound(settings: &Settings, part: &str) -> Option<u64> {
    if part.starts_with("log/") {
        let log = &settings.log;
        let per = log.retention_bytes? + log.segment_bytes;
        return Some(per * u64::from(log.partitions));
    }
    if part == "models" {
        return settings.checkpoint.schedule().keep_bytes;
    }
    None
}

fn report(
    settings: &Settings,
    samples: &[(f64, BTreeMap<String, u64>)],
    events_appended: Option<u64>,
) -> anyhow::Result<Report> {
    let (end_t, last) = samples.last().context("no measurement")?;
    let names: std::collections::BTreeSet<&String> =
        samples.iter().flat_map(|(_, m)| m.keys()).collect();
    let day = 24.0 * 3600.0;
    let second_half: Vec<&(f64, BTreeMap<String, u64>)> =
        samples.iter().filter(|(t, _)| *t >= end_t / 2.0).collect();
    let mut parts = Vec::new();
    for name in names {
        let series: Vec<(f64, f64)> = second_half
            .iter()
            .map(|(t, m)| (*t, m.get(name).copied().unwrap_or(0) as f64))
            .collect();
        let growth = slope(&series);
        let end_bytes = last.get(name).copied().unwrap_or(0);
        let peak_bytes = samples
            .iter()
            .filter_map(|(_, m)| m.get(name).copied())
            .max()
            .unwrap_or(0);
        let bound_bytes = bound(settings, name);
        let grown = end_bytes as f64 + growth.max(0.0) * (day - end_t).max(0.0);
        // A part past its bound is not held by it: it is carried like an unbounded one.
        let day_bytes = match bound_bytes {
            Some(b) if peak_bytes <= b => grown.min(b as f64).max(peak_bytes as f64),
            _ => grown.max(peak_bytes as f64),
        } as u64;
        parts.push(Part {
            name: name.clone(),
            bound_bytes,
            end_bytes,
            peak_bytes,
            growth_bytes_per_sec: growth,
            day_bytes,
        });
    }
    let peak_bytes = samples
        .iter()
        .map(|(_, m)| m.values().sum::<u64>())
        .max()
        .unwrap_or(0);
    let mut overrides: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("FRESHET__"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    overrides.sort();
    Ok(Report {
        cpu: super::cpu_model(),
        secs: *end_t,
        events_appended,
        config_file: None,
        default_config_present: Path::new("freshet.toml").exists(),
        overrides,
        end_bytes: last.values().sum(),
        peak_bytes,
        day_bytes: parts.iter().map(|p| p.day_bytes).sum(),
        parts,
    })
}

/// The least-squares slope of `(x, y)`; 0 for fewer than two distinct `x`.
fn slope(xy: &[(f64, f64)]) -> f64 {
    let n = xy.len() as f64;
    if xy.len() < 2 {
        return 0.0;
    }
    let mx = xy.iter().map(|p| p.0).sum::<f64>() / n;
    let my = xy.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = xy.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return 0.0;
    }
    xy.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_part_is_carried_to_its_bound_and_an_unbounded_one_grows_for_a_day() {
        assert!((slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 7.0)]), 0.0);
        let dir = tempfile::tempdir().unwrap();
        let s = crate::settings::load(None, &[("node.data_dir", dir.path().display().to_string())])
            .unwrap();
        let keep = s.checkpoint.schedule().keep_bytes.unwrap();
        let samples: Vec<(f64, BTreeMap<String, u64>)> = (0..=10)
            .map(|i| {
                let t = f64::from(i) * 60.0;
                let m = BTreeMap::from([
                    ("log/events".to_string(), 1_000_000 * i as u64),
                    ("joiner".to_string(), 1_000 * i as u64),
                    ("node.lock".to_string(), 10),
                    // Past its bound from the start: the bound does not hold it.
                    ("models".to_string(), keep + 60 * i as u64),
                ]);
                (t, m)
            })
            .collect();
        let r = report(&s, &samples, Some(5)).unwrap();
        let by: BTreeMap<&str, &Part> = r.parts.iter().map(|p| (p.name.as_str(), p)).collect();
        let events_bound =
            (s.log.retention_bytes.unwrap() + s.log.segment_bytes) * u64::from(s.log.partitions);
        assert_eq!(by["log/events"].bound_bytes, Some(events_bound));
        assert_eq!(by["log/events"].day_bytes, events_bound);
        // 1,000 bytes a minute for the rest of a day, on top of the 10,000 at the end.
        let joiner = by["joiner"].day_bytes as f64;
        assert!((joiner - (10_000.0 + 1_000.0 / 60.0 * (86_400.0 - 600.0))).abs() < 2.0);
        assert_eq!(by["node.lock"].day_bytes, 10);
        let models = by["models"].day_bytes as f64;
        assert!((models - (keep as f64 + 600.0 + (86_400.0 - 600.0))).abs() < 2.0);
        assert_eq!(r.end_bytes, 10_000_000 + 10_000 + 10 + keep + 600);
        assert_eq!(
            r.day_bytes,
            r.parts.iter().map(|p| p.day_bytes).sum::<u64>()
        );
    }

    #[test]
    fn a_missing_data_directory_measures_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(measure(&dir.path().join("absent")).unwrap().is_empty());
        std::fs::create_dir_all(dir.path().join("log/events/p-0")).unwrap();
        std::fs::write(dir.path().join("log/events/p-0/a.log"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("node.lock"), b"12").unwrap();
        let m = measure(dir.path()).unwrap();
        assert_eq!(m["log/events"], 100);
        assert_eq!(m["node.lock"], 2);
    }
}
