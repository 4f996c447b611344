//! `freshet node`: one process of a cluster; and the flags with which `freshet train` joins
//! one to place its shards there.
//!
//! A node with only the `shards` role hosts the shard owners other nodes place on it. A node
//! with the `serving` role (and not `trainer`) runs a replica that follows the trainer node
//! (`crate::follow`). A node with the `trainer` role is the coordinator: it runs the pipeline
//! of `freshet dev` (the supervisor, joiners, trainer, writer, validator, serving replicas and
//! the HTTP API) with each shard owner on a shard node of the cluster, and takes `freshet
//! dev`'s flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use freshet_cluster::membership::{Backoff, Lease, Role, Roles};
use freshet_cluster::node::{ClusterNode, NodeConfig, TlsFiles};

use crate::settings::{ClusterSettings, Settings};

/// The environment variable that may hold the cluster secret.
pub(crate) const COOKIE_ENV: &str = "FRESHET_CLUSTER_COOKIE";

/// How this process joins a cluster; each flag overrides its `[cluster]` key.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ClusterArgs {
    /// This node's stable id [cluster.name].
    #[arg(long, value_name = "ID")]
    pub(crate) name: Option<String>,
    /// Where the cluster port listens, IP:PORT [cluster.listen].
    #[arg(long, value_name = "ADDR")]
    pub(crate) cluster_listen: Option<String>,
    /// Seed nodes to join, comma-separated HOST:PORT [cluster.join].
    #[arg(long, value_delimiter = ',', value_name = "ADDR")]
    pub(crate) join: Vec<String>,
    /// A file holding the cluster secret [cluster.cookie_file]; else FRESHET_CLUSTER_COOKIE.
    /// Never an argument: `ps` shows arguments to every user.
    #[arg(long, value_name = "FILE")]
    pub(crate) cookie_file: Option<PathBuf>,
    /// TLS: this node's certificate, PEM [cluster.tls_cert]. With --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// TLS: this node's private key, PEM [cluster.tls_key].
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_key: Option<PathBuf>,
    /// TLS: the cluster CA, PEM: peers must present a certificate it signed [cluster.tls_ca].
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,
}

/// `freshet node`.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    /// Roles, comma-separated: any of shards, trainer, serving, joiner [cluster.roles]. The
    /// trainer role (with serving and joiner) runs the pipeline, its shards on shard nodes;
    /// serving alone runs a replica that follows the trainer node, on --listen.
    #[arg(long, value_name = "ROLES")]
    pub(crate) roles: Option<String>,
    /// The pipeline's flags, for a node with the trainer role (as `freshet dev`'s).
    #[command(flatten)]
    pub(crate) pipeline: crate::dev::DevArgs,
}

/// What a node runs, by its roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    /// The pipeline, as the coordinator (the trainer role).
    Pipeline,
    /// Shard owners only.
    Shards,
    /// A serving replica following the trainer node (and shard owners too with `shards`).
    Serving,
}

/// What a node with these roles runs; an error for a mix this release does not split across
/// nodes.
fn runs(roles: &Roles) -> anyhow::Result<Runs> {
    let trainer = roles.has(Role::Trainer);
    if trainer && roles.has(Role::Shards) {
        bail!(
            "--roles {roles}: a node with the trainer role places its shards on other nodes; \
             for every role in one process, run `freshet dev`"
        );
    }
    if trainer && !(roles.has(Role::Serving) && roles.has(Role::Joiner)) {
        bail!(
            "--roles {roles}: the joiners and serving replicas run on the trainer's node too: \
             give --roles trainer,serving,joiner"
        );
    }
    if !trainer && roles.has(Role::Joiner) {
        bail!(
            "--roles {roles}: joiners run on the node with the trainer role; other nodes take \
             --roles shards, serving, or shards,serving"
        );
    }
    Ok(if trainer {
        Runs::Pipeline
    } else if roles.has(Role::Serving) {
        Runs::Serving
    } else {
        Runs::Shards
    })
}

/// Reads the secret: the cookie file when one is given, else the environment.
fn cookie(file: Option<&Path>) -> anyhow::Result<String> {
    let secret = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the cluster cookie file {}", f.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        None => match std::env::var(COOKIE_ENV) {
            Ok(s) => s,
            Err(_) => bail!(
                "a cluster needs its secret: give --cookie-file FILE (or cluster.cookie_file), \
                 or set {COOKIE_ENV}"
            ),
        },
    };
    if secret.is_empty() {
        bail!(
            "the cluster secret is empty; every node of a cluster needs the same non-empty secret"
        );
    }
    Ok(secret)
}

/// The node's configuration from `[cluster]` and the flags over it.
pub(crate) fn node_config(
    settings: &Settings,
    args: &ClusterArgs,
    roles: Option<&str>,
    default_name: Option<String>,
) -> anyhow::Result<NodeConfig> {
    let c: &ClusterSettings = &settings.cluster;
    let name = args
        .name
        .clone()
        .or_else(|| c.name.clone())
        .or(default_name)
        .context("a node needs its stable id: give --name ID (or cluster.name)")?;
    let roles: Roles = roles
        .unwrap_or(&c.roles)
        .parse()
        .with_context(|| "--roles".to_string())?;
    let listen = args.cluster_listen.as_deref().unwrap_or(&c.listen);
    let listen = listen.parse().map_err(|_| {
        anyhow::anyhow!(
            "--cluster-listen {listen:?}: expected an IP address and port, as 127.0.0.1:7400"
        )
    })?;
    let seeds = if args.join.is_empty() {
        c.join.clone()
    } else {
        args.join.clone()
    };
    let cookie_file = args.cookie_file.as_deref().or(c.cookie_file.as_deref());
    let pick = |flag: &Option<PathBuf>, key: &Option<PathBuf>| flag.clone().or_else(|| key.clone());
    let tls = match (
        pick(&args.tls_cert, &c.tls_cert),
        pick(&args.tls_key, &c.tls_key),
        pick(&args.tls_ca, &c.tls_ca),
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
        (None, None, None) => None,
        _ => bail!(
            "TLS needs all three of --tls-cert, --tls-key and --tls-ca (or cluster.tls_cert, \
             tls_key and tls_ca), or none of them"
        ),
    };
    Ok(NodeConfig {
        name,
        roles,
        listen,
        seeds,
        cookie: cookie(cookie_file)?,
        lease: Lease::new(c.heartbeat_ms, c.lease_ms)?,
        reconnect: Backoff {
            base_ms: c.reconnect_base_ms,
            max_ms: c.reconnect_max_ms,
        },
        max_in_flight: c.max_in_flight,
        join_timeout: Duration::from_millis(c.join_timeout_ms),
        request_timeout: Duration::from_millis(c.request_timeout_ms),
        spill_dir: Some(settings.spill_dir()),
        tls,
        faults: crate::settings::faults_from_env()?,
    })
}

/// Starts the node and joins every seed; the first seed that refuses stops it.
pub(crate) async fn start(cfg: &NodeConfig) -> anyhow::Result<ClusterNode> {
    let node = ClusterNode::start(cfg).await?;
    for seed in &cfg.seeds {
        node.join(seed, cfg.join_timeout).await?;
    }
    Ok(node)
}

/// One line on stdout when the node is up and joined: scripts wait for it.
pub(crate) fn announce(node: &ClusterNode, cfg: &NodeConfig) {
    let ready = serde_json::json!({
        "node": node.name(),
        "cluster": node.addr(),
        "roles": cfg.roles.to_string(),
        "tls": cfg.tls.is_some(),
    });
    println!("{ready}");
}

/// `freshet node`: runs until SIGINT or SIGTERM.
pub(crate) fn run(args: NodeArgs, settings: &Settings) -> anyhow::Result<()> {
    let cfg = node_config(settings, &args.cluster, args.roles.as_deref(), None)?;
    match runs(&cfg.roles)? {
        Runs::Pipeline => {
            anyhow::ensure!(
                !cfg.seeds.is_empty(),
                "a node with the trainer role needs the shard nodes: give --join ADDR (or \
                 cluster.join)"
            );
            return crate::dev::run(args.pipeline, settings, Some(cfg));
        }
        Runs::Serving => {
            // With the shards role the trainer node dials it; without, it dials the trainer.
            anyhow::ensure!(
                !cfg.seeds.is_empty() || cfg.roles.has(Role::Shards),
                "a serving node follows the trainer node: give --join ADDR (or cluster.join)"
            );
            return crate::follow::run(args.pipeline.http, settings, cfg);
        }
        Runs::Shards => {}
    }
    // The hosted owners spill under the data directory: one process per directory.
    let _lock =
        crate::lock::DataDirLock::acquire(&settings.node.data_dir, "running a cluster node")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut stop = crate::stop::StopSignals::install()?;
        let node = start(&cfg).await?;
        announce(&node, &cfg);
        stop.recv().await;
        tracing::info!(node = %node.name(), "stopping");
        node.leave().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trainer_role_runs_the_pipeline_and_mixes_that_cannot_split_are_named() {
        let roles = |s: &str| s.parse::<Roles>().unwrap();
        assert_eq!(runs(&roles("shards")).unwrap(), Runs::Shards);
        assert_eq!(runs(&roles("serving")).unwrap(), Runs::Serving);
        assert_eq!(runs(&roles("shards,serving")).unwrap(), Runs::Serving);
        assert_eq!(
            runs(&roles("trainer,serving,joiner")).unwrap(),
            Runs::Pipeline
        );
        for (mix, says) in [
            ("trainer", "--roles trainer,serving,joiner"),
            ("trainer,serving", "--roles trainer,serving,joiner"),
            ("shards,trainer,serving,joiner", "freshet dev"),
            (
                "serving,joiner",
                "joiners run on the node with the trainer role",
            ),
            ("shards,joiner", "other nodes take --roles shards, serving"),
        ] {
            let e = runs(&roles(mix)).unwrap_err().to_string();
            assert!(e.contains(says), "{mix}: {e}");
        }
    }
}
