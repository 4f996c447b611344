//! `freshet node --roles serving`: a serving replica on a node of its own, following the
//! trainer node's publications over the network, behind the same HTTP API as `freshet serve`.
//!
//! The node keeps a mirror of the versions it serves in `<data_dir>/models`, written only from
//! what the trainer node sends ([`freshet_cluster::node::follower`]). Cut off from the trainer
//! node, it goes on answering from the last version it has; `/healthz` says `cut_off` and
//! gives the version's age, `/metrics` has `freshet_serving_version_age_seconds` and
//! `freshet_follower_source_reachable`. A node that starts serves the newest version its
//! mirror holds that did not fail validation, until the trainer node's last publication
//! arrives.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use freshet_actors::ckpt::ModelStore;
use freshet_actors::serving::replica::{ReplicaArgs, ReplicaHandle};
use freshet_actors::serving::{ModelCell, ReplicaSet};
use freshet_cluster::node::follower::{FollowerArgs, FollowerHandle};
use freshet_cluster::node::NodeConfig;

use crate::http::{Counters, HttpArgs, ServingState};
use crate::settings::Settings;

/// Runs the serving node until SIGINT or SIGTERM.
pub(crate) fn run(http: HttpArgs, settings: &Settings, cfg: NodeConfig) -> anyhow::Result<()> {
    http.check()?;
    let _lock =
        crate::lock::DataDirLock::acquire(&settings.node.data_dir, "running a serving node")?;
    let root = settings.node.data_dir.join("models");
    let mirror = ModelStore::open(&root)
        .with_context(|| format!("opening the model mirror {}", root.display()))?;
    mirror
        .remove_stale_temporaries()
        .with_context(|| format!("cleaning the model mirror {}", root.display()))?;
    let listeners = crate::http::listen(&http)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(http, settings, cfg, mirror, listeners))
}

async fn serve(
    http: HttpArgs,
    settings: &Settings,
    cfg: NodeConfig,
    mirror: ModelStore,
    listeners: crate::http::Listeners,
) -> anyhow::Result<()> {
    let mut stop = crate::stop::StopSignals::install()?;
    let node = crate::cluster::start(&cfg).await?;
    let cell = Arc::new(ModelCell::new());
    let (replica, _join) = ReplicaHandle::spawn(ReplicaArgs {
        name: format!("node-{}", cfg.name),
        store: mirror.clone(),
        cell: cell.clone(),
        faults: Default::default(),
    })
    .await
    .context("starting the serving replica")?;
    let m = mirror.clone();
    if let Some(v) = tokio::task::spawn_blocking(move || newest_servable(&m)).await? {
        eprintln!("serving version {v} from the mirror until the trainer node's publication");
        replica.publish(v)?;
    }
    let (follower, _join) = FollowerHandle::spawn(FollowerArgs {
        cluster: node.clone(),
        mirror: mirror.clone(),
        replica: replica.clone(),
        keep_full: settings.checkpoint.keep_full,
        catch_up_every: Duration::from_millis(cfg.lease.interval_ms),
    })
    .await
    .context("starting the model follower")?;
    let replicas = ReplicaSet::with_len(1);
    replicas.set(0, replica.clone());
    let state = web::Data::new(ServingState {
        store: mirror,
        cell,
        replicas,
        max_candidates: http.max_candidates,
        max_in_flight: http.max_in_flight,
        scoring: tokio::sync::Semaphore::new(http.scoring_threads()),
        counters: Counters::default(),
        metrics: Vec::new(),
        stopped: Default::default(),
        following: Some(follower.clone()),
    });
    let servers = crate::http::bind(state, &http, &settings.http, listeners, |_, _| {})?;
    servers.announce(false);
    crate::cluster::announce(&node, &cfg);
    let running = servers.spawn();
    stop.recv().await;
    tracing::info!(node = %node.name(), "stopping");
    if let Err(e) = running.stop().await {
        tracing::warn!(error = %format!("{e:#}"), "stopping the HTTP servers");
    }
    follower.stop();
    replica.stop();
    node.leave().await;
    Ok(())
}

/// The newest version of the mirror that no rollback made history and that did not fail
/// validation.
fn newest_servable(mirror: &ModelStore) -> Option<u64> {
    let versions = mirror.versions().ok()?;
    versions.into_iter().rev().find(|&v| {
        mirror.manifest(v).is_ok_and(|m| {
            m.rolled_back.is_none() && m.validation.as_ref().is_none_or(|val| val.passed)
        })
    })
}
