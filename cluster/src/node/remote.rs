//! Shard owners on other nodes behind the same [`ShardHandle`] the trainer uses for local
//! ones: [`RemoteShard`] is a local actor that takes the owner's messages and sends them over
//! the network, and [`ClusterPlacer`] places a job's shards on the cluster's shard nodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::protocol::{NodeAnswer, NodeCall, WireAnswer, WireRequest};
use super::{lock, ClusterNode, Shared};
use crate::membership::Role;
use crate::placement::Placement;
use crate::wire::Remote;
use crate::wire::{RemoteEmbeddingError, ShardAnswer};
use freshet_actors::ckpt::ShardPlacement;
use freshet_actors::embedding::{ShardSnapshot, TableConfig};
use freshet_actors::envelope::Envelope;
use freshet_actors::ids::{ShardId, TableName};
use freshet_actors::shard::{ShardHandle, ShardMsg, ShardPlacer, ShardRouter};

/// The stand-in for a shard owner on another node.
#[derive(Debug)]
pub struct RemoteShard;

#[derive(Debug)]
pub struct RemoteShardState {
    shared: Arc<Shared>,
    node: String,
    shard: ShardId,
    /// The placement this stand-in reaches its owner through; every request carries it.
    epoch: u64,
}

impl RemoteShard {
    /// A handle to shard `shard`, hosted on `node` at placement `epoch`; linked to
    /// `supervisor` when given.
    pub async fn handle(
        cluster: &ClusterNode,
        node: &str,
        shard: ShardId,
        epoch: u64,
        supervisor: Option<ractor::ActorCell>,
    ) -> Result<ShardHandle, ractor::SpawnErr> {
        let state = RemoteShardState {
            shared: cluster.shared().clone(),
            node: node.to_owned(),
            shard,
            epoch,
        };
        let (actor, _join) = match supervisor {
            Some(sup) => Actor::spawn_linked(None, RemoteShard, state, sup).await?,
            None => Actor::spawn(None, RemoteShard, state).await?,
        };
        Ok(ShardHandle::new(shard, actor))
    }
}

/// The owner's answer for a call's outcome on the wire.
fn shard_answer(node: &str, outcome: Result<WireAnswer, String>) -> ShardAnswer {
    match outcome {
        Ok(WireAnswer::Shard(a)) => a,
        Ok(WireAnswer::Fault(reason)) => ShardAnswer::Refused(RemoteEmbeddingError::Other(
            format!("node {node}: {reason}"),
        )),
        Ok(WireAnswer::Fenced(reason)) => ShardAnswer::Refused(RemoteEmbeddingError::Unreachable(
            format!("node {node} fenced the placement: {reason}"),
        )),
        Ok(WireAnswer::Node(a)) => ShardAnswer::Refused(RemoteEmbeddingError::Other(format!(
            "node {node} answered a shard call with {a:?}"
        ))),
        Err(reason) => ShardAnswer::Refused(RemoteEmbeddingError::Unreachable(reason)),
    }
}

impl Actor for RemoteShard {
    type Msg = ShardMsg;
    type State = RemoteShardState;
    type Arguments = RemoteShardState;

    async fn pre_start(
        &self,
        _myself: ActorRef<ShardMsg>,
        state: RemoteShardState,
    ) -> Result<RemoteShardState, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        st: &mut RemoteShardState,
    ) -> Result<(), ActorProcessingErr> {
        let Envelope { trace, body } = msg;
        let (call, responder) = match body.into_call() {
            Ok(split) => split,
            Err(e) => {
                // A local-only request (a restore from this node's store): the caller's port
                // drops and it sees the owner unavailable.
                tracing::warn!(shard = st.shard, error = %e, "a request that cannot cross nodes");
                return Ok(());
            }
        };
        let node = st.node.clone();
        let shard = st.shard;
        let (shared, epoch) = (st.shared.clone(), st.epoch);
        let done = Box::new(move |outcome: Result<WireAnswer, String>| {
            // The owner is no longer this placement's: the placer's failover places every
            // shard again (retrying a fenced owner would only be refused again).
            if let Ok(WireAnswer::Fenced(reason)) = &outcome {
                tracing::warn!(shard, node = %node, epoch, reason = %reason, "the shard's placement was fenced");
                let _ = shared.changes.send(super::NodeEvent::Fenced {
                    node: node.clone(),
                    shard,
                    epoch,
                    why: reason.clone(),
                });
            }
            if let Some(responder) = responder {
                if let Err(e) = responder(shard_answer(&node, outcome)) {
                    tracing::debug!(shard, error = %e, "an answer nobody waits for");
                }
            }
        });
        let request = WireRequest::Shard {
            shard,
            epoch: st.epoch,
            call: Envelope::with_trace(trace, call),
        };
        // Awaited here, so that requests leave in mailbox order and a node at its in-flight
        // bound holds this mailbox, and so the trainer, back.
        st.shared.request(&st.node, &request, done).await;
        Ok(())
    }
}

/// Places a job's shard owners on the cluster's shard nodes by rendezvous hashing.
#[derive(Debug, Clone)]
pub struct ClusterPlacer {
    cluster: ClusterNode,
    /// The epoch of the next placement.
    next_epoch: Arc<AtomicU64>,
    /// Only these shard nodes, when given.
    only: Option<Vec<String>>,
    placed: Arc<Mutex<Option<Placement>>>,
}

impl ClusterPlacer {
    /// A placer whose first placement has `epoch`; each later one has the next.
    pub fn new(cluster: ClusterNode, epoch: u64) -> Self {
        Self {
            cluster,
            next_epoch: Arc::new(AtomicU64::new(epoch)),
            only: None,
            placed: Arc::new(Mutex::new(None)),
        }
    }

    /// Places on these of the up shard nodes only.
    pub fn on_nodes(mut self, nodes: Vec<String>) -> Self {
        self.only = Some(nodes);
        self
    }

    /// The placement made last, with every node it spans.
    pub fn last_placement(&self) -> Option<Placement> {
        lock(&self.placed).clone()
    }

    /// Stops the owners placed on each node, every node tried; the errors are joined.
    pub async fn release(&self) -> anyhow::Result<()> {
        let Some(p) = self.last_placement() else {
            return Ok(());
        };
        let mut failed = Vec::new();
        for node in p.nodes() {
            if p.shards_of(node).is_empty() {
                continue;
            }
            match self.cluster.call_node(node, NodeCall::ReleaseShards).await {
                Ok(NodeAnswer::Released { .. }) => {}
                Ok(other) => failed.push(format!("{node} answered {other:?}")),
                Err(e) => failed.push(format!("{node}: {e}")),
            }
        }
        if !failed.is_empty() {
            bail!("releasing the shards: {}", failed.join("; "));
        }
        Ok(())
    }

    /// Stops the owners of placement `last` on the nodes that are still reachable, before the
    /// shards are placed again: a shard that moves leaves no owner behind, and one that stays
    /// is started over at the new epoch. A lost node fences its owners itself.
    async fn release_stale(&self, last: &Placement) {
        for node in last.nodes() {
            if last.shards_of(node).is_empty() || !self.cluster.reachable(node) {
                continue;
            }
            match self.cluster.call_node(node, NodeCall::ReleaseShards).await {
                Ok(NodeAnswer::Released { .. }) => {}
                Ok(other) => {
                    tracing::warn!(node = %node, answer = ?other, "releasing the owners of the last placement")
                }
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "releasing the owners of the last placement")
                }
            }
        }
    }

    async fn place_all(
        &self,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        mut restore: Vec<Option<ShardSnapshot>>,
    ) -> anyhow::Result<ShardRouter> {
        let placement = self.new_placement(count).await?;
        restore.resize(count as usize, None);
        let mut handles = Vec::with_capacity(count as usize);
        let epoch = placement.epoch();
        for (s, snap) in (0..count).zip(restore) {
            let node = placement.node_of(s);
            self.host(node, s, count, epoch, tables.clone(), snap)
                .await?;
            handles.push(
                RemoteShard::handle(&self.cluster, node, s, epoch, None)
                    .await
                    .with_context(|| format!("the stand-in of shard {s}"))?,
            );
        }
        Ok(ShardRouter::new(handles).with_placement(record(&placement)))
    }

    /// The shard nodes a placement may use now: up, with a session open, and among those of
    /// [`Self::on_nodes`].
    fn candidates(&self) -> Vec<String> {
        let mut nodes = self.cluster.up_with(Role::Shards);
        nodes.retain(|n| self.cluster.reachable(n));
        if let Some(only) = &self.only {
            nodes.retain(|n| only.contains(n));
        }
        nodes
    }

    /// Where `count` shards would be placed now, over the reachable shard nodes (its epoch
    /// is not one of this placer's); none with no shard node reachable.
    pub fn choice(&self, count: u32) -> Option<Placement> {
        Placement::new(self.candidates(), count, 0).ok()
    }

    /// A placement of `count` shards over the reachable shard nodes, at the next epoch,
    /// recorded before any owner starts, so that a placement failing halfway is released.
    /// With none reachable it waits up to twice the lease for one (a lost node dialled again,
    /// a new one joining) before it fails.
    async fn new_placement(&self, count: u32) -> anyhow::Result<Placement> {
        let lease = Duration::from_millis(self.cluster.lease_ms());
        let deadline = tokio::time::Instant::now() + 2 * lease;
        let nodes = loop {
            let nodes = self.candidates();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !nodes.is_empty() || left.is_zero() {
                break nodes;
            }
            // A heartbeat is what makes a node up; the sessions open just before.
            self.cluster
                .heard_within(left.min(Duration::from_millis(100)))
                .await;
        };
        if nodes.is_empty() {
            bail!(
                "no node with the shards role is up: start one with `freshet node --roles \
                 shards` and give its cluster address to --join"
            );
        }
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let placement = Placement::new(nodes, count, epoch)?;
        *lock(&self.placed) = Some(placement.clone());
        tracing::info!(
            shards = count,
            nodes = ?placement.nodes(),
            epoch = placement.epoch(),
            "shards placed"
        );
        Ok(placement)
    }

    /// Asks `node` to host shard `s` of `count` for the placement of `epoch`.
    async fn host(
        &self,
        node: &str,
        s: ShardId,
        count: u32,
        epoch: u64,
        tables: Vec<(TableName, TableConfig)>,
        restore: Option<ShardSnapshot>,
    ) -> anyhow::Result<()> {
        let call = NodeCall::HostShard {
            shard: s,
            shard_count: count,
            epoch,
            tables,
            restore: restore.map(Box::new),
        };
        match self.cluster.call_node(node, call).await {
            Ok(NodeAnswer::Hosted) => Ok(()),
            Ok(NodeAnswer::Refused(reason)) => {
                bail!("node {node} refused to host shard {s}: {reason}")
            }
            Ok(other) => bail!("node {node} answered hosting shard {s} with {other:?}"),
            Err(e) => Err(e).with_context(|| format!("placing shard {s} on {node}")),
        }
    }

    async fn place_one(
        &self,
        s: ShardId,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        supervisor: ractor::ActorCell,
    ) -> anyhow::Result<ShardHandle> {
        // Shard 0 starts first, so its start is a new placement: the pipeline's first, or
        // the failover's (which restarts every shard). A later shard keeps the placement
        // while its node is reachable; a placement only some shards use is never made, so
        // a lost node stays in the placement until the failover places every shard again.
        let last = lock(&self.placed).clone();
        let placement = match last {
            Some(p) if s != 0 && p.shards() == count => {
                let node = p.node_of(s);
                if !self.cluster.reachable(node) {
                    bail!(
                        "node {node} of shard {s} is not reachable; the failover places every \
                         shard again"
                    );
                }
                p
            }
            last => {
                let placement = self.new_placement(count).await?;
                if let Some(last) = last {
                    self.release_stale(&last).await;
                }
                placement
            }
        };
        let node = placement.node_of(s);
        let epoch = placement.epoch();
        self.host(node, s, count, epoch, tables, None).await?;
        RemoteShard::handle(&self.cluster, node, s, epoch, Some(supervisor))
            .await
            .with_context(|| format!("the stand-in of shard {s}"))
    }
}

/// What a version's manifest records of a placement.
fn record(placement: &Placement) -> ShardPlacement {
    ShardPlacement {
        epoch: placement.epoch(),
        nodes: (0..placement.shards())
            .map(|s| placement.node_of(s).to_owned())
            .collect(),
    }
}

impl ShardPlacer for ClusterPlacer {
    fn place(
        &self,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        restore: Vec<Option<ShardSnapshot>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<ShardRouter>> + Send + '_>>
    {
        Box::pin(self.place_all(count, tables, restore))
    }

    fn place_shard(
        &self,
        shard: ShardId,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        supervisor: ractor::ActorCell,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<ShardHandle>> + Send + '_>>
    {
        Box::pin(self.place_one(shard, count, tables, supervisor))
    }

    fn placement(&self) -> Option<ShardPlacement> {
        lock(&self.placed).as_ref().map(record)
    }

    fn local_node(&self) -> String {
        self.cluster.name().to_owned()
    }
}
