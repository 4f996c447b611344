//! The set of a node's serving replicas, as the supervisor keeps it.

use std::sync::{Arc, RwLock};

use crate::serving::replica::ReplicaHandle;
use crate::serving::{ServingError, ServingModel};

/// The node's serving replicas, as they are now. The supervisor replaces an entry when it
/// restarts that replica, so holders of the set always reach the live actors.
#[derive(Clone, Debug, Default)]
pub struct ReplicaSet {
    inner: Arc<RwLock<Vec<Option<ReplicaHandle>>>>,
}

impl ReplicaSet {
    pub fn with_len(n: usize) -> Self {
        Self {
            inner: Arc::new(RwLock::new(vec![None; n])),
        }
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
        self.handles()
            .iter()
            .filter_map(|h| h.publish_traced(v, trace.clone()).err())
            .collect()
    }

    /// The model the first replica serves now.
    pub fn serving(&self) -> Option<Arc<ServingModel>> {
        self.handles().first().and_then(|h| h.cell().current())
    }
}
