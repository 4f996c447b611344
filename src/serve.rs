//! `freshet serve`: a ServingReplica behind the HTTP API, following a model store.
//!
//! Here the publisher is a store follower: every new version whose validation did not fail is
//! published in order. In a full node the validator publishes instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use clap::Args;
use freshet_actors::ckpt::ModelStore;
use freshet_actors::serving::replica::{ReplicaArgs, ReplicaHandle};
use freshet_actors::serving::{ModelCell, ReplicaSet};

use crate::http::{Counters, HttpArgs, ServingState};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The model store to serve from (default: <data_dir>/models).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(flatten)]
    http: HttpArgs,
    /// How often the store is checked for new versions, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

/// Publishes every version after `after` that did not fail validation, oldest first.
fn publish_new(store: &ModelStore, replica: &ReplicaHandle, after: Option<u64>) -> Option<u64> {
    let versions = match store.versions() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "listing the model store");
            return after;
        }
    };
    let mut last = after;
    for v in versions.into_iter().filter(|&v| Some(v) > after) {
        let Ok(m) = store.manifest(v) else {
            // Written by a rename, so a manifest that does not read now never will: skip it.
            tracing::warn!(version = v, "unreadable manifest; not published");
            last = Some(v);
            continue;
        };
        if m.validation.as_ref().is_some_and(|val| !val.passed) {
            tracing::info!(version = v, "failed validation; not published");
        } else if let Err(e) = replica.publish(v) {
            tracing::error!(error = %e, "publishing to the replica");
            return last;
        }
        last = Some(v);
    }
    last
}

pub(crate) fn run(args: ServeArgs, settings: &Settings) -> anyhow::Result<()> {
    let root = args
        .store
        .clone()
        .unwrap_or_else(|| settings.node.data_dir.join("models"));
    let store = ModelStore::open_existing(&root)
        .with_context(|| format!("opening the model store {}", root.display()))?;
    args.http.check()?;
    let listeners = crate::http::listen(&args.http)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(args, store, &settings.http, listeners))
}

async fn serve(
    args: ServeArgs,
    store: ModelStore,
    limits: &crate::settings::HttpSettings,
    listeners: crate::http::Listeners,
) -> anyhow::Result<()> {
    let cell = Arc::new(ModelCell::new());
    let (replica, _join) = ReplicaHandle::spawn(ReplicaArgs {
        name: "serve".into(),
        store: store.clone(),
        cell: cell.clone(),
        faults: Default::default(),
    })
    .await
    .context("starting the serving replica")?;
    let follower = {
        let (store, replica) = (store.clone(), replica.clone());
        let every = Duration::from_millis(args.poll_ms.max(1));
        tokio::spawn(async move {
            let mut after = None;
            loop {
                let (s, r) = (store.clone(), replica.clone());
                after = tokio::task::spawn_blocking(move || publish_new(&s, &r, after))
                    .await
                    .unwrap_or(after);
                tokio::time::sleep(every).await;
            }
        })
    };
    let replicas = ReplicaSet::with_len(1);
    replicas.set(0, replica.clone());
    let state = web::Data::new(ServingState {
        store,
        cell,
        replicas,
        max_candidates: args.http.max_candidates,
        max_in_flight: args.http.max_in_flight,
        scoring: tokio::sync::Semaphore::new(args.http.scoring_threads()),
        counters: Counters::default(),
        metrics: Vec::new(),
        stopped: Default::default(),
        following: None,
    });
    let servers = crate::http::bind(state, &args.http, limits, listeners, |_, _| {})?;
    servers.announce(false);
    let running = servers.spawn();
    let stopper = running.stopper();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("shutting down");
            stopper.stop().await;
        }
    });
    running.join().await?;
    follower.abort();
    replica.stop();
    Ok(())
}
