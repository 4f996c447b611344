//! The set of a node's serving replicas, as the supervisor keeps it.

use std::sync::{Arc, RwLock};

use crate::serving::replica::ReplicaHandle;
use crate::serving::{ServingError, ServingModel};

/// Told of every publication after the node's own replicas: how replicas on other nodes follow
/// (the cluster sends the version there). It must not block: it runs on the publisher's task.
pub type PublishFollower = Arc<dyn Fn(u64, &crate::envelope::TraceContext) + Send + Sync + 'static>;

/// The node's serving replicas, as they are now. The supervisor replaces an entry when it
/// restarts that replica, so holders of the set always reach the live actors.
#[derive(Clone, Default)]
pub struct ReplicaSet {
    inner: Arc<RwLock<Vec<Option<ReplicaHandle>>>>,
    followers: Arc<RwLock<Vec<PublishFollower>>>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let followers = self.followers.read().map_or(0, |v| v.len());
        f.debug_struct("ReplicaSet")
            .field("replicas", &self.handles())
            .field("followers", &followers)
            .finish()
    }
}

impl ReplicaSet {
    pub fn with_len(n: usize) -> Self {
        Self {
            inner: Arc::new(RwLock::new(vec![None; n])),
            followers: Arc::default(),
        }
    }

    /// Adds a follower, told of every publication from now on (rollbacks included).
    pub fn follow(&self, f: PublishFollower) {
        self.followers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
    }

    pub fn set(&self, i: usize, h: ReplicaHandle) {
        let mut v = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if v.len() <= i {
            v.resize(i + 1, None);
        }
        v[i] = Some(h);
    }

    pub fn handles(&self) -> Vec<ReplicaHandle> {
        let v = self.inner.read().unwrap_or_else(|p| p.into_inner());
        v.iter().flatten().cloned().collect()
    }

    /// Sends version `v` to every replica; returns the errors of those that are down.
    pub fn publish(&self, v: u64) -> Vec<ServingError> {
        self.publish_traced(v, &crate::envelope::TraceContext::none())
    }

    /// [`ReplicaSet::publish`] as part of `trace`: each replica's apply is a child of it.
    pub fn publish_traced(
        &self,
        v: u64,
        trace: &crate::envelope::TraceContext,
    ) -> Vec<ServingError> {
        let errors = self
            .handles()
            .iter()
            .filter_map(|h| h.publish_traced(v, trace.clone()).err())
            .collect();
        let followers = self.followers.read().unwrap_or_else(|p| p.into_inner());
        for f in followers.iter() {
            f(v, trace);
        }
        errors
    }

    /// The model the first replica serves now.
    pub fn serving(&self) -> Option<Arc<ServingModel>> {
        self.handles().first().and_then(|h| h.cell().current())
    }
}
