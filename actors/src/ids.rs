//! Identifiers shared by every component and every node.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A feature id: the 64-bit key of one embedding row.
///
/// Ids come from hashing feature values (see the feature hashing in the sample code) or from
/// the application directly. Every u64 is a valid id; tables never reserve a value.
pub type FeatureId = u64;

/// The index of one embedding shard, in `0..shard_count`.
pub type ShardId = u32;

/// The name of an embedding table, such as `user_id` or `item_category`.
///
/// Cheap to clone (an `Arc<str>`), because it travels in every batched request.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TableName(Arc<str>);

impl TableName {
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl From<&str> for TableName {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for TableName {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl AsRef<str> for TableName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
