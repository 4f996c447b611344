//! Which node hosts which shard.
//!
//! Keys map to shards by `freshet_actors::shard_of`, which never changes. Shards map to nodes
//! here, by rendezvous (highest random weight) hashing over node ids (Thaler and Ravishankar
//! 1998): every node draws a weight for every shard from a fixed hash of the pair, and the
//! shard lives on the node with the highest weight. A node that joins takes only the shards
//! it now outweighs, about `1/(n + 1)` of them, all from the others; a node that leaves gives
//! up only its own, each to the node that was second for it. `s mod nodes` moved most shards
//! on either.
//!
//! The weights depend only on the node id and the shard, never on the order nodes were listed
//! in, the time or the process, so every node computes the same placement from the same
//! membership. A placement carries an epoch, which the coordinator raises at each change of
//! membership, so that a version's manifest and a remote request can name the placement they
//! belong to. A restart or rebalance moves whole shards, never individual keys.

use freshet_actors::routing::mix64;
use freshet_actors::ShardId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error(
        "a placement needs at least one node and one shard (got {nodes} nodes, {shards} shards)"
    )]
    Empty { nodes: usize, shards: u32 },
    #[error("node id {0:?} is listed twice: node ids must be unique in a cluster")]
    DuplicateNode(String),
    #[error("a node id must not be empty")]
    EmptyNodeId,
}

/// Shards spread over nodes by rendezvous hashing, at an epoch. It travels (in manifests, to
/// other nodes) as its membership alone, and is rebuilt and checked from it on arrival.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PlacementWire", into = "PlacementWire")]
pub struct Placement {
    epoch: u64,
    /// Sorted, so that equal memberships make equal placements.
    nodes: Vec<String>,
    shards: u32,
    /// `owners[s]`: the index in `nodes` of shard `s`'s node.
    owners: Vec<u32>,
}

/// A placement as it is stored and sent: what it is computed from.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementWire {
    epoch: u64,
    nodes: Vec<String>,
    shards: u32,
}

impl TryFrom<PlacementWire> for Placement {
    type Error = PlacementError;

    fn try_from(w: PlacementWire) -> Result<Self, Self::Error> {
        Placement::new(w.nodes, w.shards, w.epoch)
    }
}

impl From<Placement> for PlacementWire {
    fn from(p: Placement) -> Self {
        Self {
            epoch: p.epoch,
            nodes: p.nodes,
            shards: p.shards,
        }
    }
}

/// A 64-bit hash of a node id that every build computes alike: FNV-1a over its bytes, then
/// the SplitMix64 finalizer, since FNV alone leaves ids that differ in their last byte close.
fn node_hash(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The weight node `node` (its [`node_hash`]) draws for `shard`.
fn weight(node: u64, shard: ShardId) -> u64 {
    // The shard is mixed on its own first, so that consecutive shards draw unrelated weights.
    mix64(node ^ mix64(u64::from(shard) ^ 0x9e37_79b9_7f4a_7c15))
}

impl Placement {
    /// The placement of `shards` shards over `nodes` (in any order), at `epoch`.
    pub fn new(nodes: Vec<String>, shards: u32, epoch: u64) -> Result<Self, PlacementError> {
        if nodes.is_empty() || shards == 0 {
            return Err(PlacementError::Empty {
                nodes: nodes.len(),
                shards,
            });
        }
        let mut nodes = nodes;
        nodes.sort_unstable();
        if let Some(w) = nodes.windows(2).find(|w| w[0] == w[1]) {
            return Err(PlacementError::DuplicateNode(w[0].clone()));
        }
        if nodes.iter().any(String::is_empty) {
            return Err(PlacementError::EmptyNodeId);
        }
        let hashes: Vec<u64> = nodes.iter().map(|n| node_hash(n)).collect();
        let owners = (0..shards)
            .map(|s| {
                // Highest weight wins; a tie (two ids hashing alike) goes to the smaller id,
                // which is the earlier one in the sorted list.
                let mut best = 0usize;
                for (i, &h) in hashes.iter().enumerate().skip(1) {
                    if weight(h, s) > weight(hashes[best], s) {
                        best = i;
                    }
                }
                best as u32
            })
            .collect();
        Ok(Self {
            epoch,
            nodes,
            shards,
            owners,
        })
    }

    /// The epoch this placement was made at.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The nodes, sorted by id.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The node hosting `shard`.
    ///
    /// # Panics
    /// If `shard` is not below [`Placement::shards`]: shard ids come from `shard_of` with the
    /// same count, so a larger one is a bug, not data.
    pub fn node_of(&self, shard: ShardId) -> &str {
        &self.nodes[self.owners[shard as usize] as usize]
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

    /// The placement after a change of membership to `nodes`, at the next epoch.
    pub fn with_nodes(&self, nodes: Vec<String>) -> Result<Self, PlacementError> {
        Self::new(nodes, self.shards, self.epoch + 1)
    }

    /// The shards whose node differs between `self` and `other` (both of the same shard
    /// count), ascending: what a change of membership moves.
    pub fn moved(&self, other: &Placement) -> Vec<ShardId> {
        (0..self.shards.min(other.shards))
            .filter(|&s| self.node_of(s) != other.node_of(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn every_shard_has_exactly_one_node_whatever_the_order_nodes_come_in() {
        let p = Placement::new(names(3), 8, 1).unwrap();
        let mut all: Vec<ShardId> = p.nodes().iter().flat_map(|n| p.shards_of(n)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        let mut reversed = names(3);
        reversed.reverse();
        assert_eq!(Placement::new(reversed, 8, 1).unwrap(), p);
        assert_eq!(
            p.node_of_key(42),
            p.node_of(freshet_actors::shard_of(42, 8))
        );
    }

    #[test]
    fn bad_memberships_are_refused() {
        assert_eq!(
            Placement::new(vec![], 4, 0),
            Err(PlacementError::Empty {
                nodes: 0,
                shards: 4
            })
        );
        assert_eq!(
            Placement::new(names(2), 0, 0),
            Err(PlacementError::Empty {
                nodes: 2,
                shards: 0
            })
        );
        assert_eq!(
            Placement::new(vec!["a".into(), "b".into(), "a".into()], 4, 0),
            Err(PlacementError::DuplicateNode("a".into()))
        );
        assert_eq!(
            Placement::new(vec!["a".into(), String::new()], 4, 0),
            Err(PlacementError::EmptyNodeId)
        );
    }

    /// A join moves only shards to the new node, and about `1/(n + 1)` of them; a leave moves
    /// only the leaver's shards. Round robin moved most of them on both.
    #[test]
    fn a_join_or_a_leave_moves_about_one_nth_of_the_shards() {
        let shards = 256;
        for n in 1..8 {
            let before = Placement::new(names(n), shards, 3).unwrap();
            let after = before.with_nodes(names(n + 1)).unwrap();
            assert_eq!(after.epoch(), 4);
            let moved = before.moved(&after);
            let new = format!("node-{n}");
            assert!(moved.iter().all(|&s| after.node_of(s) == new), "n = {n}");
            assert_eq!(moved.len(), after.shards_of(&new).len());
            let expected = f64::from(shards) / (n + 1) as f64;
            // Binomial(256, 1/(n+1)): within 4 standard deviations.
            let sd = (expected * (1.0 - 1.0 / (n + 1) as f64)).sqrt();
            assert!(
                (moved.len() as f64 - expected).abs() <= 4.0 * sd,
                "n = {n}: moved {} of {shards}, expected about {expected:.0}",
                moved.len()
            );

            // The new node leaves again: exactly its shards go back where they were.
            let back = after.with_nodes(names(n)).unwrap();
            assert_eq!(after.moved(&back), moved, "n = {n}");
            assert_eq!(back.moved(&before), Vec::<ShardId>::new());
        }
    }

    #[test]
    fn shards_spread_evenly() {
        let p = Placement::new(names(4), 1024, 0).unwrap();
        for n in p.nodes() {
            let c = p.shards_of(n).len();
            // Binomial(1024, 1/4): mean 256, sd 13.9.
            assert!((200..=312).contains(&c), "{n}: {c} shards");
        }
    }

    /// The placement is part of every version's manifest and of every node's view of the
    /// cluster, so it must not change between builds: these owners are what this function
    /// gave when it was fixed. If this test fails, nodes of two builds would disagree on where
    /// shards live.
    #[test]
    fn the_placement_function_is_frozen() {
        assert_eq!(node_hash(""), mix64(0xcbf2_9ce4_8422_2325));
        let p = Placement::new(names(3), 12, 0).unwrap();
        let owners: Vec<&str> = (0..12).map(|s| p.node_of(s)).collect();
        assert_eq!(owners, FROZEN, "{owners:?}");
    }

    /// A placement read from elsewhere is rebuilt from its membership, so a bad one is an
    /// error, never a panic later.
    #[test]
    fn a_placement_travels_as_its_membership_and_a_bad_one_is_refused() {
        let p = Placement::new(names(3), 12, 5).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"epoch":5,"nodes":["node-0","node-1","node-2"],"shards":12}"#
        );
        assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), p);
        for bad in [
            r#"{"epoch":1,"nodes":[],"shards":4}"#,
            r#"{"epoch":1,"nodes":["a","a"],"shards":4}"#,
            r#"{"epoch":1,"nodes":["a"],"shards":0}"#,
            r#"{"epoch":1,"nodes":["a"],"shards":4,"owners":[7,7,7,7]}"#,
            r#"{"epoch":1,"nodes":"a","shards":4}"#,
        ] {
            assert!(serde_json::from_str::<Placement>(bad).is_err(), "{bad}");
        }
    }

    const FROZEN: [&str; 12] = [
        "node-2", "node-0", "node-2", "node-1", "node-0", "node-0", "node-0", "node-2", "node-1",
        "node-1", "node-1", "node-2",
    ];
}
