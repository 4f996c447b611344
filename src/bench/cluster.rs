//! `freshet bench cluster`: the same offline W&D training with the shard owners in this
//! process, on one other node process and on two, in one run on loopback: samples/s of each
//! and their ratio to in-process, and the bytes that crossed per sample against the floor
//! (the floats a lookup brings back and a push sends, nothing else).
//!
//! The node processes share the machine's cores with the trainer, so on a small machine this
//! measures what the network hop costs, not how a cluster scales.

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use freshet_actors::sample::Format;
use freshet_actors::training::offline::{self, OfflineJob, OfflineReport, OfflineStart, Quiet};
use freshet_actors::training::FreshModel;
use freshet_cluster::membership::{Backoff, Lease, Roles};
use freshet_cluster::node::{ClusterNode, ClusterPlacer, NodeConfig};
use serde::Serialize;

use super::{cpu_model, print_report, progress};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct ClusterBenchArgs {
    /// Generated rows to train on (Criteo layout), one epoch per configuration.
    #[arg(long, default_value_t = 300_000)]
    rows: u64,
    /// Shards, in every configuration.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Rounds: each trains in process, on one node and on two, in that order; medians are
    /// reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print one JSON object instead of indented JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Config {
    /// Median samples/s over the rounds.
    samples_per_sec: f64,
    per_round: Vec<f64>,
    /// Median over the in-process median.
    vs_in_process: f64,
    /// Bytes that crossed, both ways, per sample trained (median round).
    bytes_per_sample: f64,
}

#[derive(Debug, Serialize)]
struct ClusterReport {
    cpu: String,
    rows: u64,
    shards: u32,
    batch: usize,
    threads: usize,
    rounds: usize,
    in_process: Config,
    one_node: Config,
    two_nodes: Config,
    /// Bytes per sample that lookups and pushes must move at the least: each step's unique
    /// rows, as floats, once each way.
    floor_bytes_per_sample: f64,
    /// Bytes per sample on two nodes over the floor.
    two_nodes_vs_floor: f64,
}

/// This process as a node on loopback, with `roles`, the lease and limits of `[cluster]`, and
/// no seeds (the bench joins or is joined).
pub(super) fn loopback_node(
    settings: &Settings,
    name: &str,
    roles: &str,
    cookie: String,
) -> anyhow::Result<NodeConfig> {
    let c = &settings.cluster;
    Ok(NodeConfig {
        name: name.to_owned(),
        roles: roles.parse::<Roles>()?,
        listen: "127.0.0.1:0".parse()?,
        seeds: Vec::new(),
        cookie,
        lease: Lease::new(c.heartbeat_ms, c.lease_ms)?,
        reconnect: Backoff {
            base_ms: c.reconnect_base_ms,
            max_ms: c.reconnect_max_ms,
        },
        max_in_flight: c.max_in_flight,
        join_timeout: Duration::from_millis(c.join_timeout_ms),
        request_timeout: Duration::from_millis(c.request_timeout_ms),
        spill_dir: None,
        tls: None,
        faults: Default::default(),
    })
}

/// A `freshet node` child, killed when dropped.
pub(super) struct NodeProcess {
    child: std::process::Child,
    pub(super) addr: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(dir: &Path, name: &str, cookie: &str) -> anyhow::Result<NodeProcess> {
    start_node_with(dir, name, cookie, "shards", &[])
}

/// A `freshet node` child with `roles` and `extra` flags, its log in `dir/<name>.log`.
pub(super) fn start_node_with(
    dir: &Path,
    name: &str,
    cookie: &str,
    roles: &str,
    extra: &[&str],
) -> anyhow::Result<NodeProcess> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut child = std::process::Command::new(&exe)
        .arg("--data-dir")
        .arg(dir.join(name))
        .args(["node", "--name", name, "--roles", roles])
        .args(["--cluster-listen", "127.0.0.1:0"])
        .args(extra)
        .env(crate::cluster::COOKIE_ENV, cookie)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} node", exe.display()))?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("the node's stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let ready: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(_) => {
            let _ = child.kill();
            bail!(
                "node {name} did not start; see {}",
                dir.join(format!("{name}.log")).display()
            );
        }
    };
    let addr = ready["cluster"]
        .as_str()
        .context("the node's ready line has no address")?
        .to_owned();
    Ok(NodeProcess { child, addr })
}

fn job(
    settings: &Settings,
    a: &ClusterBenchArgs,
    data: &Path,
    dir: &Path,
) -> anyhow::Result<OfflineJob> {
    let schema = settings.schema.clone();
    let model = settings.model.clone();
    let tables = settings
        .model_tables(&schema, &model)?
        .into_iter()
        .collect();
    Ok(OfflineJob {
        start: OfflineStart::Fresh(FreshModel {
            schema,
            model,
            tables,
        }),
        data: vec![data.to_path_buf()],
        format: Format::Criteo,
        test: Vec::new(),
        holdout: 0.0,
        predictions: None,
        log: None,
        epochs: 1,
        batch: settings.train.batch,
        threads: settings.train.threads,
        shards: a.shards,
        reserve_rows: None,
        max_rows: None,
        rejects: dir.join("rejects.tsv"),
        spill_dir: dir.join("spill"),
        out: None,
        placer: None,
    })
}

fn median(v: &[f64]) -> f64 {
    super::median(v)
}

pub(super) fn run(a: ClusterBenchArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.rows > 0 && a.rounds > 0,
        "--rows and --rounds must be positive"
    );
    let tmp = tempfile::tempdir().context("a scratch directory")?;
    let dir = tmp.path();
    let data = dir.join("train.tsv");
    progress(&format!("generating {} rows", a.rows));
    let exe = std::env::current_exe().context("finding this binary")?;
    let gen = std::process::Command::new(&exe)
        .args(["gen", "--rows", &a.rows.to_string(), "--seed", "1", "--out"])
        .arg(&data)
        .output()
        .context("running gen")?;
    anyhow::ensure!(
        gen.status.success(),
        "gen failed: {}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let cookie = format!("bench-{}-{}", std::process::id(), rand_suffix());
    let nodes = [
        start_node(dir, "bench-a", &cookie)?,
        start_node(dir, "bench-b", &cookie)?,
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let name = format!("bench-trainer-{}", std::process::id());
        let cfg = loopback_node(settings, &name, "trainer", cookie)?;
        let me = ClusterNode::start(&cfg).await?;
        for n in &nodes {
            me.join(&n.addr, cfg.join_timeout).await?;
        }
        let mut runs: [Vec<(f64, f64)>; 3] = Default::default();
        let mut floor = Vec::new();
        for round in 1..=a.rounds {
            for (i, on) in [
                None,
                Some(vec!["bench-a"]),
                Some(vec!["bench-a", "bench-b"]),
            ]
            .into_iter()
            .enumerate()
            {
                let mut j = job(settings, &a, &data, dir)?;
                let placer = on.map(|on| {
                    let names = on.into_iter().map(str::to_owned).collect();
                    ClusterPlacer::new(me.clone(), round as u64).on_nodes(names)
                });
                j.placer = placer
                    .clone()
                    .map(|p| Arc::new(p) as Arc<dyn freshet_actors::shard::ShardPlacer>);
                let before = me.stats();
                let r: OfflineReport = offline::run(j, &mut Quiet).await?;
                let after = me.stats();
                if let Some(p) = &placer {
                    p.release().await?;
                }
                let samples = r.train_rows.max(1) as f64;
                let bytes = (after.bytes_sent + after.bytes_received)
                    .saturating_sub(before.bytes_sent + before.bytes_received);
                runs[i].push((r.samples_per_sec, bytes as f64 / samples));
                if i == 0 {
                    floor.push(r.row_floats as f64 * 4.0 * 2.0 / samples);
                }
                progress(&format!(
                    "round {round}: {}: {:.0} samples/s, {:.0} bytes/sample",
                    ["in process", "one node", "two nodes"][i],
                    r.samples_per_sec,
                    bytes as f64 / samples
                ));
            }
        }
        me.leave().await;
        let local = median(&runs[0].iter().map(|r| r.0).collect::<Vec<_>>());
        let config = |rs: &[(f64, f64)]| {
            let per_round: Vec<f64> = rs.iter().map(|r| r.0).collect();
            let sps = median(&per_round);
            Config {
                samples_per_sec: sps,
                vs_in_process: sps / local,
                bytes_per_sample: median(&rs.iter().map(|r| r.1).collect::<Vec<_>>()),
                per_round,
            }
        };
        let floor = median(&floor);
        let two = config(&runs[2]);
        anyhow::Ok(ClusterReport {
            cpu: cpu_model(),
            rows: a.rows,
            shards: a.shards,
            batch: settings.train.batch,
            threads: settings.train.threads,
            rounds: a.rounds,
            in_process: config(&runs[0]),
            one_node: config(&runs[1]),
            two_nodes_vs_floor: two.bytes_per_sample / floor,
            two_nodes: two,
            floor_bytes_per_sample: floor,
        })
    })?;
    drop(nodes);
    print_report(&report, a.json)
}

/// A few random bits for the bench cluster's secret: it only keeps other benches out.
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}
