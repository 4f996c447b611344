//! Which node hosts which shard.
//!
//! Keys map to shards by `freshet_actors::shard_of`, which never changes. Shards map to nodes
//! here: shard `s` of `n` lives on node `s mod nodes`, in the order the membership lists nodes.
//! A restart or rebalance moves whole shards, never individual keys.

use freshet_actors::ShardId;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error(
        "a placement needs at least one node and one shard (got {nodes} nodes, {shards} shards)"
    )]
    Empty { nodes: usize, shards: u32 },
}

/// Shards spread over nodes, round robin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    nodes: Vec<String>,
    shards: u32,
}

impl Placement {
    pub fn new(nodes: Vec<String>, shards: u32) -> Result<Self, PlacementError> {
        if nodes.is_empty() || shards == 0 {
            return Err(PlacementError::Empty {
                nodes: nodes.len(),
                shards,
            });
        }
        Ok(Self { nodes, shards })
    }

    /// The node hosting `shard`.
    pub fn node_of(&self, shard: ShardId) -> &str {
        &self.nodes[shard as usize % self.nodes.len()]
    }

    /// The shards hosted by `node`, ascending.
    pub fn shards_of(&self, node: &str) -> Vec<ShardId> {
        (0..self.shards)
            .filter(|&s| self.node_of(s) == node)
            .collect()
    }

    /// The node owning `key`.
    pub fn node_of_key(&self, key: u64) -> &str {
        self.node_of(freshet_actors::shard_of(key, self.shards))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_has_exactly_one_node() {
        let p = Placement::new(vec!["a".into(), "b".into(), "c".into()], 8).unwrap();
        let mut all: Vec<ShardId> = ["a", "b", "c"]
            .iter()
            .flat_map(|n| p.shards_of(n))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(p.shards_of("a"), vec![0, 3, 6]);
        assert_eq!(
            p.node_of_key(42),
            p.node_of(freshet_actors::shard_of(42, 8))
        );
        assert_eq!(
            Placement::new(vec![], 4),
            Err(PlacementError::Empty {
                nodes: 0,
                shards: 4
            })
        );
    }
}
