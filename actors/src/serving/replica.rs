//! The ServingReplica actor: keeps a [`ModelCell`] at the newest published version.
//!
//! - **Takes in:** `Publish(v)`, from whoever decides publication (the validator in a full
//!   node, the store follower of `freshet serve`), and status requests.
//! - **Reads:** the model store. A version that descends from the one being served by deltas
//!   alone (its child, or a later one when publications were passed over) has those deltas
//!   applied in order to the spare copy, which then serves in one swap; any other (the first
//!   load, a rollback, another chain) is restored whole and installed.
//! - **Shares:** the cell, which request handlers read without going through the mailbox, so a
//!   busy replica never queues predictions behind an update.
//! - **Keeps:** counters; the pin it holds in the store for the version it serves, so that
//!   retention never deletes it.
//!
//! **Restart.** Built from [`ReplicaArgs`]: the cell survives (readers keep serving the last
//! version) and the next publish brings it forward.

use std::sync::Arc;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use super::{CellStats, ModelCell, ModelDelta, ServingError, ServingModel};
use crate::ckpt::{Manifest, ModelStore, VersionKind};
use crate::envelope::{Envelope, TraceContext};
use crate::fault::Faults;
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct ReplicaArgs {
    /// The replica's name in the store's pins.
    pub name: String,
    pub store: ModelStore,
    pub cell: Arc<ModelCell>,
    /// Fault points for supervision tests: `replica.publish`.
    pub faults: Faults,
}

#[derive(Debug)]
pub enum ReplicaRequest {
    Publish(u64),
    Status(RpcReplyPort<ReplicaStatus>),
}

pub type ReplicaMsg = Envelope<ReplicaRequest>;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub version: Option<u64>,
    pub rows: usize,
    pub publishes: u64,
    pub full_loads: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub cell: CellStats,
}

#[derive(Debug, Default)]
pub struct ServingReplica;

#[derive(Debug)]
pub struct ReplicaState {
    args: ReplicaArgs,
    status: ReplicaStatus,
}

/// The most deltas applied in a row to reach a published version; a longer way is restored
/// whole. A chain is never longer than `checkpoint.full_every`, so this only bounds the work.
const MAX_DELTAS: usize = 256;

/// The versions from `served` (excluded) to `v`, oldest first, when `v` (manifest `m`)
/// descends from `served` by deltas alone.
fn deltas_since(store: &ModelStore, served: u64, v: u64, m: Manifest) -> Option<Vec<u64>> {
    let mut chain = vec![v];
    let mut cur = m;
    loop {
        match cur.parent {
            Some(p) if p == served && cur.kind == VersionKind::Delta => {
                chain.reverse();
                return Some(chain);
            }
            Some(p) if p > served && cur.kind == VersionKind::Delta && chain.len() < MAX_DELTAS => {
                // A parent that cannot be read: the whole restore reports why.
                cur = store.manifest(p).ok()?;
                chain.push(p);
            }
            _ => return None,
        }
    }
}

/// Brings `cell` to version `v` of `store`; returns whether it loaded the version whole.
/// The pure part of the actor, synchronous.
fn bring_to(
    store: &ModelStore,
    cell: &ModelCell,
    name: &str,
    v: u64,
) -> Result<bool, ServingError> {
    let served = cell.version();
    if served == Some(v) {
        return Ok(false);
    }
    let m = store.manifest(v)?;
    let chain = served.and_then(|s| deltas_since(store, s, v, m));
    let whole = chain.is_none();
    match chain {
        // Every delta on the way, in one swap: readers go from the served version to `v`.
        Some(chain) => {
            let deltas = (chain.into_iter())
                .map(|u| {
                    let (manifest, dense, shards) = store.read_delta(u)?;
                    Ok(Arc::new(ModelDelta {
                        manifest,
                        dense,
                        shards,
                    }))
                })
                .collect::<Result<Vec<_>, ServingError>>()?;
            cell.apply_chain(deltas)?;
        }
        None => cell.install(ServingModel::from_restored(store.restore(v, None)?)?),
    }
    // Pin what is served, so retention keeps it; a failed pin is reported, not fatal.
    if let Err(e) = store.pin(name, v) {
        tracing::warn!(replica = %name, version = v, error = %e, "could not pin the served version");
    }
    Ok(whole)
}

impl Actor for ServingReplica {
    type Msg = ReplicaMsg;
    type State = ReplicaState;
    type Arguments = ReplicaArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ReplicaArgs,
    ) -> Result<ReplicaState, ActorProcessingErr> {
        let status = ReplicaStatus {
            name: args.name.clone(),
            ..ReplicaStatus::default()
        };
        Ok(ReplicaState { args, status })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        let trace = msg.trace;
        match msg.body {
            ReplicaRequest::Publish(v) => {
                let span = telemetry::received(&trace, || {
                    tracing::info_span!(target: telemetry::TARGET, "replica.apply",
                        freshet.replica = %st.args.name, freshet.version = v as i64,
                        freshet.load = tracing::field::Empty)
                });
                st.args.faults.check("replica.publish");
                st.status.publishes += 1;
                // Reading and applying a version is blocking file and memory work.
                let (store, cell, name) = (
                    st.args.store.clone(),
                    st.args.cell.clone(),
                    st.args.name.clone(),
                );
                let r = tokio::task::spawn_blocking(move || bring_to(&store, &cell, &name, v))
                    .await
                    .unwrap_or_else(|e| Err(ServingError::Model(format!("publish task: {e}"))));
                span.record(
                    "freshet.load",
                    match &r {
                        Ok(true) => "full",
                        Ok(false) => "delta",
                        Err(_) => "failed",
                    },
                );
                match r {
                    Ok(true) => st.status.full_loads += 1,
                    Ok(false) => {}
                    Err(e) => {
                        telemetry::set_attribute(&span, "error.type", "apply_failed");
                        tracing::error!(replica = %st.args.name, version = v, error = %e, "could not serve the published version; still serving the previous one");
                        st.status.failures += 1;
                        st.status.last_error = Some(format!("version {v}: {e}"));
                    }
                }
            }
            ReplicaRequest::Status(reply) => {
                let mut s = st.status.clone();
                let current = st.args.cell.current();
                s.version = current.as_ref().map(|m| m.version());
                s.rows = current.as_ref().map_or(0, |m| m.rows());
                s.cell = st.args.cell.stats();
                let _ = reply.send(s);
            }
        }
        Ok(())
    }
}

/// A typed handle to a ServingReplica.
#[derive(Debug, Clone)]
pub struct ReplicaHandle {
    actor: ActorRef<ReplicaMsg>,
    cell: Arc<ModelCell>,
}

impl ReplicaHandle {
    pub async fn spawn(
        args: ReplicaArgs,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        let cell = args.cell.clone();
        let (actor, join) = Actor::spawn(None, ServingReplica, args).await?;
        Ok((Self { actor, cell }, join))
    }

    /// Starts a replica linked to a supervisor.
    pub async fn spawn_linked(
        args: ReplicaArgs,
        supervisor: ractor::ActorCell,
    ) -> Result<Self, ractor::SpawnErr> {
        let cell = args.cell.clone();
        let (actor, _join) = Actor::spawn_linked(None, ServingReplica, args, supervisor).await?;
        Ok(Self { actor, cell })
    }

    pub fn actor_cell(&self) -> ractor::ActorCell {
        self.actor.get_cell()
    }

    /// The model cell request handlers read from.
    pub fn cell(&self) -> &Arc<ModelCell> {
        &self.cell
    }

    /// Asks the replica to serve version `v` (applied in the order publishes are sent).
    pub fn publish(&self, v: u64) -> Result<(), ServingError> {
        self.publish_traced(v, TraceContext::none())
    }

    /// [`ReplicaHandle::publish`] as part of `trace` (the version's life): the replica's apply
    /// is a child span of it.
    pub fn publish_traced(&self, v: u64, trace: TraceContext) -> Result<(), ServingError> {
        self.actor
            .send_message(Envelope::with_trace(trace, ReplicaRequest::Publish(v)))
            .map_err(|e| ServingError::Model(format!("the replica is not running: {e}")))
    }

    /// The replica's counters, once every publish sent before has been handled.
    pub async fn status(&self) -> Result<ReplicaStatus, ServingError> {
        match self
            .actor
            .call(|reply| Envelope::new(ReplicaRequest::Status(reply)), None)
            .await
        {
            Ok(CallResult::Success(s)) => Ok(s),
            Ok(_) => Err(ServingError::Model(
                "the replica stopped before replying".into(),
            )),
            Err(e) => Err(ServingError::Model(format!(
                "the replica is not running: {e}"
            ))),
        }
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
