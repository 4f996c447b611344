//! How a trainer node follows its cluster: it fails its shards over when a node hosting one
//! is lost or a shard node fenced the placement in use, and rebalances them when the
//! placement would choose other nodes (a shard node joined, or `freshet ctl rebalance`).
//!
//! Both are the same move: every shard is placed again at the next epoch and the trainer
//! restores them all from a version (`PipelineHandle::fail_over`). A failover restores the
//! newest live version, and what the lost node held after it is trained again from the log. A
//! rebalance first asks for a version at the next step boundary, so the shards that move take
//! their rows with them (the new owners are restored from it) and little is trained again;
//! training pauses from the trainer's stop to the new trainer's start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_actors::online::pipeline::{CommandError, PipelineHandle};
use freshet_cluster::node::{ClusterNode, ClusterPlacer, NodeEvent};
use freshet_cluster::placement::Placement;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

/// How long a rebalance waits for the version it asks for before it moves the shards anyway
/// (a trainer with nothing new to write writes none; the newest version is then current).
const CAPTURE_WITHIN: Duration = Duration::from_secs(5);

/// A trainer node's placements over time.
#[derive(Debug)]
pub(crate) struct Placements {
    node: ClusterNode,
    placer: ClusterPlacer,
    pipe: PipelineHandle,
    /// One failover or rebalance at a time.
    moving: tokio::sync::Mutex<()>,
}

/// A shard that moves, and between which nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Move {
    pub(crate) shard: u32,
    pub(crate) from: String,
    pub(crate) to: String,
}

/// What a rebalance did: `ctl rebalance`'s answer.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Rebalanced {
    /// The shards that moved; none when the placement's choice is the placement in use.
    pub(crate) moved: Vec<Move>,
    /// The placement in use after it.
    pub(crate) epoch: Option<u64>,
    pub(crate) nodes: Vec<String>,
    /// The version the shards were restored from: the one written for the move, or the
    /// newest when the trainer had nothing new.
    pub(crate) version: Option<u64>,
    /// How long training paused: from the trainer's stop to the new trainer's start.
    pub(crate) pause_ms: u64,
}

/// The shards whose node differs between `from` and `to`.
fn moves(from: &Placement, to: &Placement) -> Vec<Move> {
    (from.moved(to).into_iter())
        .map(|s| Move {
            shard: s,
            from: from.node_of(s).to_owned(),
            to: to.node_of(s).to_owned(),
        })
        .collect()
}

/// The nodes a placement puts at least one shard on, in shard order of first use.
fn used_nodes(p: &Placement) -> Vec<String> {
    let mut nodes: Vec<String> = Vec::new();
    for s in 0..p.shards() {
        let n = p.node_of(s);
        if !nodes.iter().any(|m| m == n) {
            nodes.push(n.to_owned());
        }
    }
    nodes
}

impl Placements {
    pub(crate) fn new(node: ClusterNode, placer: ClusterPlacer, pipe: PipelineHandle) -> Self {
        Self {
            node,
            placer,
            pipe,
            moving: tokio::sync::Mutex::new(()),
        }
    }

    /// Follows the cluster until it stops, from `events` (subscribed before the pipeline
    /// started, so that no loss is missed): a failover whenever a node hosting shards is lost
    /// and not reachable again, a shard's placement was fenced, or this node stalled; a
    /// rebalance whenever a shard node joins. Events queued together are decided together:
    /// one loss often comes as several (a stall, then every node's lease; a closed session,
    /// then the lease), and a loss or fence of a placement already replaced is let be.
    pub(crate) fn spawn(
        self: Arc<Self>,
        mut events: broadcast::Receiver<NodeEvent>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let (mut batch, mut missed) = match events.recv().await {
                    Ok(e) => (vec![e], false),
                    Err(RecvError::Lagged(_)) => (Vec::new(), true),
                    Err(RecvError::Closed) => return,
                };
                loop {
                    match events.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(TryRecvError::Lagged(_)) => missed = true,
                        Err(_) => break,
                    }
                }
                if self.pipe.gave_up().is_some() {
                    return;
                }
                self.decide(batch, missed).await;
            }
        })
    }

    /// What a batch of events calls for: at most one failover, then at most one rebalance.
    async fn decide(&self, batch: Vec<NodeEvent>, missed: bool) {
        let placement = self.placer.last_placement();
        let mut why: Option<String> = None;
        let mut joined = Vec::new();
        for event in batch {
            match event {
                NodeEvent::Lost { node, why: w } => {
                    let shards = placement
                        .as_ref()
                        .map_or(Vec::new(), |p| p.shards_of(&node));
                    // Back already: if it fenced meanwhile, its refusals say so.
                    if !shards.is_empty() && !self.node.reachable(&node) && why.is_none() {
                        why = Some(format!("node {node} {w}; it hosted shards {shards:?}"));
                    }
                }
                NodeEvent::Stalled { ms } => {
                    why.get_or_insert(format!(
                        "this node did not run for {ms} ms, longer than its lease allows: the \
                         shard nodes may have fenced its placement"
                    ));
                }
                NodeEvent::Fenced {
                    node,
                    shard,
                    epoch,
                    why: w,
                } if placement.as_ref().is_some_and(|p| p.epoch() == epoch) => {
                    why.get_or_insert(format!(
                        "node {node} fenced shard {shard} of placement {epoch}: {w}"
                    ));
                }
                NodeEvent::Fenced { .. } => {}
                NodeEvent::Joined { node } => joined.push(node),
            }
        }
        if why.is_none() && missed {
            // Missed events may have held a loss: act if a node in use is unreachable now.
            let lost = placement.as_ref().map_or(Vec::new(), |p| {
                (used_nodes(p).into_iter())
                    .filter(|n| !self.node.reachable(n))
                    .collect()
            });
            if !lost.is_empty() {
                why = Some(format!(
                    "cluster events were missed, and nodes {lost:?} are unreachable"
                ));
            }
        }
        if let Some(why) = why {
            self.fail_over(&why).await;
        }
        if !joined.is_empty() {
            let why = format!("shard nodes {joined:?} joined");
            match self.rebalance(&why).await {
                Ok(r) if r.moved.is_empty() => tracing::info!(
                    nodes = ?joined,
                    "shard nodes joined; the placement keeps every shard where it is"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(
                    nodes = ?joined,
                    error = %format!("{e:#}"),
                    "the rebalance after a join did not finish"
                ),
            }
        }
    }

    /// Places every shard again and restores the newest live version (see the module doc).
    async fn fail_over(&self, why: &str) {
        let _one = self.moving.lock().await;
        tracing::warn!(reason = %why, "failing over: placing every shard again");
        let started = Instant::now();
        match self.pipe.fail_over(why).await {
            Ok(()) => {
                let placed = self.placer.last_placement();
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    epoch = placed.as_ref().map(|p| p.epoch()),
                    nodes = ?placed.as_ref().map(used_nodes),
                    "failed over: the shards are placed again and training resumed from the newest live version"
                );
            }
            // The supervisor restarts what did not start, with its backoff.
            Err(e) => tracing::error!(error = %format!("{e:#}"), "the failover did not finish"),
        }
    }

    /// Moves the shards whose node the placement would choose differently now, if any: a
    /// version at the next step boundary, then every shard placed again at the next epoch and
    /// restored from it.
    pub(crate) async fn rebalance(&self, why: &str) -> Result<Rebalanced, CommandError> {
        let _one = self.moving.lock().await;
        let current = self
            .placer
            .last_placement()
            .ok_or_else(|| CommandError::Conflict("the shards are not placed yet".into()))?;
        let choice = self.placer.choice(current.shards()).ok_or_else(|| {
            CommandError::Conflict("no node with the shards role is reachable".into())
        })?;
        let moved = moves(&current, &choice);
        if moved.is_empty() {
            return Ok(Rebalanced {
                moved,
                epoch: Some(current.epoch()),
                nodes: used_nodes(&current),
                version: None,
                pause_ms: 0,
            });
        }
        tracing::info!(reason = %why, moves = ?moved, "rebalancing: a version at the next step boundary, then the shards that move");
        let captured = self.pipe.capture_now(CAPTURE_WITHIN).await?;
        let started = Instant::now();
        self.pipe.fail_over(why).await?;
        let pause_ms = started.elapsed().as_millis() as u64;
        let placed = self.placer.last_placement();
        let version = match captured {
            Some(v) => Some(v),
            None => self.pipe.status().await?.latest_live_version,
        };
        let done = Rebalanced {
            moved,
            epoch: placed.as_ref().map(Placement::epoch),
            nodes: placed.as_ref().map(used_nodes).unwrap_or_default(),
            version,
            pause_ms,
        };
        tracing::info!(
            pause_ms,
            epoch = done.epoch,
            nodes = ?done.nodes,
            version = done.version,
            moved = done.moved.len(),
            "rebalanced: the shards that moved were restored on their new nodes"
        );
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_is_a_shard_whose_node_differs_and_nodes_are_those_used() {
        let two = Placement::new(vec!["a".into(), "b".into()], 8, 1).unwrap();
        // A placement depends on the names only: with these, "d" outweighs the others on
        // some shards of 8.
        let three = Placement::new(vec!["a".into(), "b".into(), "d".into()], 8, 2).unwrap();
        let moved = moves(&two, &three);
        // Rendezvous: a node that joins takes shards only for itself.
        assert!(!moved.is_empty());
        assert!(
            moved.iter().all(|m| m.to == "d" && m.from != "d"),
            "{moved:?}"
        );
        for s in 0..8 {
            let m = moved.iter().find(|m| m.shard == s);
            assert_eq!(m.is_some(), two.node_of(s) != three.node_of(s));
        }
        assert!(moves(&two, &two).is_empty());
        let used = used_nodes(&three);
        assert!(used.iter().all(|n| !three.shards_of(n).is_empty()));
        assert_eq!(
            used.len(),
            ["a", "b", "d"]
                .iter()
                .filter(|n| !three.shards_of(n).is_empty())
                .count()
        );
    }
}
