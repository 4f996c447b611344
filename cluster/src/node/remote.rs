//! Shard owners on other nodes behind the same [`ShardHandle`] the trainer uses for local
//! ones: [`RemoteShard`] is a local actor that takes the owner's messages and sends them over
//! the network, and [`ClusterPlacer`] places a job's shards on the cluster's shard nodes.

use std::sync::{Arc, Mutex};

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
}

impl RemoteShard {
    /// A handle to shard `shard`, hosted on `node`; linked to `supervisor` when given.
    pub async fn handle(
        cluster: &ClusterNode,
        node: &str,
        shard: ShardId,
        supervisor: Option<ractor::ActorCell>,
    ) -> Result<ShardHandle, ractor::SpawnErr> {
        let state = RemoteShardState {
            shared: cluster.shared().clone(),
            node: node.to_owned(),
            shard,
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
        let done = Box::new(move |outcome: Result<WireAnswer, String>| {
            if let Some(responder) = responder {
                if let Err(e) = responder(shard_answer(&node, outcome)) {
                    tracing::debug!(shard, error = %e, "an answer nobody waits for");
                }
            }
        });
        let request = WireRequest::Shard {
            shard,
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
    epoch: u64,
    /// Only these shard nodes, when given.
    only: Option<Vec<String>>,
    placed: Arc<Mutex<Option<Placement>>>,
}

impl ClusterPlacer {
    pub fn new(cluster: ClusterNode, epoch: u64) -> Self {
        Self {
            cluster,
            epoch,
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

    async fn place_all(
        &self,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        mut restore: Vec<Option<ShardSnapshot>>,
    ) -> anyhow::Result<ShardRouter> {
        let placement = self.new_placement(count)?;
        restore.resize(count as usize, None);
        let mut handles = Vec::with_capacity(count as usize);
        for (s, snap) in (0..count).zip(restore) {
            let node = placement.node_of(s);
            self.host(node, s, count, tables.clone(), snap).await?;
            handles.push(
                RemoteShard::handle(&self.cluster, node, s, None)
                    .await
                    .with_context(|| format!("the stand-in of shard {s}"))?,
            );
        }
        Ok(ShardRouter::new(handles).with_placement(record(&placement)))
    }

    /// A placement of `count` shards over the up shard nodes (those of [`Self::on_nodes`]),
    /// recorded before any owner starts, so that a placement failing halfway is released.
    fn new_placement(&self, count: u32) -> anyhow::Result<Placement> {
        let mut nodes = self.cluster.up_with(Role::Shards);
        if let Some(only) = &self.only {
            nodes.retain(|n| only.contains(n));
        }
        if nodes.is_empty() {
            bail!(
                "no node with the shards role is up: start one with `freshet node --roles \
                 shards` and give its cluster address to --join"
            );
        }
        let placement = Placement::new(nodes, count, self.epoch)?;
        *lock(&self.placed) = Some(placement.clone());
        tracing::info!(
            shards = count,
            nodes = ?placement.nodes(),
            epoch = placement.epoch(),
            "shards placed"
        );
        Ok(placement)
    }

    /// Asks `node` to host shard `s` of `count`.
    async fn host(
        &self,
        node: &str,
        s: ShardId,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        restore: Option<ShardSnapshot>,
    ) -> anyhow::Result<()> {
        let call = NodeCall::HostShard {
            shard: s,
            shard_count: count,
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
        let kept = lock(&self.placed).clone().filter(|p| p.shards() == count);
        let placement = match kept {
            Some(p) => p,
            None => self.new_placement(count)?,
        };
        let node = placement.node_of(s);
        self.host(node, s, count, tables, None).await?;
        RemoteShard::handle(&self.cluster, node, s, Some(supervisor))
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
