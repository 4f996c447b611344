//! Models across nodes: the trainer node offers its model store and tells the serving nodes
//! of each publication; a serving node asks it for the versions its mirror lacks (see
//! [`follower`](super::follower)).
//!
//! Architecture invariant: a serving node never reads the trainer node's disk. Every byte of
//! a version reaches it in a [`NodeAnswer::Version`], and its mirror writes the version only
//! after checking the manifest and every file against it.

use std::sync::atomic::Ordering;

use freshet_actors::ckpt::{ModelStore, VersionFiles};
use freshet_actors::envelope::TraceContext;

use super::protocol::{NodeAnswer, NodeCall, Published};
use super::{lock, ClusterError, ClusterNode};
use crate::membership::Role;

impl ClusterNode {
    /// Offers `store` to the serving nodes: they may fetch its versions and ask for the last
    /// publication, `serving` until the next [`ClusterNode::published`].
    pub fn offer_models(&self, store: ModelStore, serving: Option<u64>) {
        *lock(&self.shared.models) = Some(store);
        if let Some(version) = serving {
            let mut last = lock(&self.shared.published);
            if last.is_none() {
                *last = Some(Published {
                    seq: self.shared.publish_seq.fetch_add(1, Ordering::Relaxed),
                    version,
                    trace: TraceContext::none(),
                });
            }
        }
    }

    /// Records a publication and tells every serving node that is up, without waiting: a
    /// node that misses the notice (down, cut off) finds the publication when it catches up.
    pub fn published(&self, version: u64, trace: &TraceContext) {
        let p = Published {
            seq: self.shared.publish_seq.fetch_add(1, Ordering::Relaxed),
            version,
            trace: trace.clone(),
        };
        *lock(&self.shared.published) = Some(p.clone());
        let me = self.name().to_owned();
        for node in self.up_with(Role::Serving) {
            if node == me {
                continue;
            }
            let (cluster, p) = (self.clone(), p.clone());
            tokio::spawn(async move {
                match cluster.call_node(&node, NodeCall::Published(p)).await {
                    Ok(NodeAnswer::Noted) => {}
                    Ok(other) => {
                        tracing::warn!(node = %node, version, answer = ?other, "a serving node did not take a publication")
                    }
                    Err(e) => {
                        tracing::debug!(node = %node, version, error = %e, "a publication notice was not delivered; the node catches up")
                    }
                }
            });
        }
    }

    /// The last version `node` published.
    pub async fn newest_published(&self, node: &str) -> Result<Option<Published>, ClusterError> {
        match self.call_node(node, NodeCall::NewestPublished).await? {
            NodeAnswer::Newest(p) => Ok(p),
            other => Err(refused(node, other)),
        }
    }

    /// Version `version` of `node`'s model store, as sent (unchecked: the mirror checks it).
    pub async fn fetch_version(
        &self,
        node: &str,
        version: u64,
    ) -> Result<VersionFiles, ClusterError> {
        match self
            .call_node(node, NodeCall::FetchVersion { version })
            .await?
        {
            NodeAnswer::Version(v) if v.version == version => Ok(*v),
            NodeAnswer::Version(v) => Err(ClusterError::Fault {
                node: node.to_owned(),
                reason: format!("asked for version {version}, sent version {}", v.version),
            }),
            other => Err(refused(node, other)),
        }
    }

    /// The last notice of publication this node took, with the node that sent it.
    pub fn notices(&self) -> tokio::sync::watch::Receiver<Option<(String, Published)>> {
        self.shared.notices.subscribe()
    }
}

fn refused(node: &str, answer: NodeAnswer) -> ClusterError {
    let reason = match answer {
        NodeAnswer::Refused(r) => r,
        other => format!("answered with {other:?}"),
    };
    ClusterError::Fault {
        node: node.to_owned(),
        reason,
    }
}

/// The trainer node's side of a fetch: the version from the store it offers, read on a
/// blocking thread (a version may be large; the endpoint goes on reading packets meanwhile).
pub(crate) async fn export(store: Option<ModelStore>, here: &str, version: u64) -> NodeAnswer {
    let Some(store) = store else {
        return NodeAnswer::Refused(format!("node {here} offers no model store"));
    };
    match tokio::task::spawn_blocking(move || store.export_version(version)).await {
        Ok(Ok(v)) => NodeAnswer::Version(Box::new(v)),
        Ok(Err(e)) => NodeAnswer::Refused(format!("version {version} on node {here}: {e}")),
        Err(e) => NodeAnswer::Refused(format!("reading version {version}: {e}")),
    }
}
