//! Who is in the cluster, and whether each node is alive: the membership table.
//!
//! The transport tells a node that a session opened or closed, and nothing else in time: a peer
//! that stops answering (a stopped process, a partition) keeps its TCP session until the kernel
//! gives up, minutes later. So liveness is decided here, from heartbeats: every node sends one
//! each `interval`, and a node none has been received from for longer than `lease` is down. The
//! table is checked every `interval`, so a silent node is marked down within `lease` plus one
//! `interval` of its last heartbeat, and up again at its next one.
//!
//! This is a plain synchronous core, like the joiner's window: the membership actor feeds it
//! the heartbeats it receives and the ticks of its clock, and acts on the changes it returns.
//! Every time is the receiving node's own clock (`now_ms`): no two nodes' clocks are compared.
//! A node that restarts comes back with a larger `incarnation` (its start time), which tells a
//! heartbeat of the new process from a late one of the old.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a node does in a cluster (`freshet node --roles`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Hosts embedding ShardOwners.
    Shards,
    /// May run the coordinator: the supervisor, the trainer and the validator.
    Trainer,
    /// Hosts serving replicas.
    Serving,
    /// Runs sample joiners.
    Joiner,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Shards, Role::Trainer, Role::Serving, Role::Joiner];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Shards => "shards",
            Role::Trainer => "trainer",
            Role::Serving => "serving",
            Role::Joiner => "joiner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RoleError {
    #[error("unknown role {0:?}: roles are shards, trainer, serving and joiner")]
    Unknown(String),
    #[error("no role given: a node takes at least one of shards, trainer, serving, joiner")]
    Empty,
}

impl FromStr for Role {
    type Err = RoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| RoleError::Unknown(s.to_owned()))
    }
}

/// A set of roles, parsed from a comma-separated list (`shards,trainer`), sorted and without
/// repeats; one read from elsewhere is checked the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Role>")]
pub struct Roles(Vec<Role>);

impl TryFrom<Vec<Role>> for Roles {
    type Error = RoleError;

    fn try_from(mut roles: Vec<Role>) -> Result<Self, Self::Error> {
        if roles.is_empty() {
            return Err(RoleError::Empty);
        }
        roles.sort_unstable();
        roles.dedup();
        Ok(Self(roles))
    }
}

impl Roles {
    pub fn all() -> Self {
        Self(Role::ALL.to_vec())
    }

    pub fn has(&self, r: Role) -> bool {
        self.0.contains(&r)
    }

    pub fn iter(&self) -> impl Iterator<Item = Role> + '_ {
        self.0.iter().copied()
    }
}

impl FromStr for Roles {
    type Err = RoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Role::from_str)
            .collect::<Result<Vec<_>, _>>()?
            .try_into()
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(r.as_str())?;
        }
        Ok(())
    }
}

/// How often heartbeats go out and how long one keeps a node up (`[cluster]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub interval_ms: u64,
    pub lease_ms: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error(
        "a heartbeat lease of {lease_ms} ms is not longer than its interval of {interval_ms} ms: \
         one late heartbeat would mark a node down; give a lease longer than the interval \
         (three intervals or more rides out two lost heartbeats)"
    )]
    TooShort { interval_ms: u64, lease_ms: u64 },
    #[error("the heartbeat interval must be at least 1 ms")]
    ZeroInterval,
}

impl Lease {
    pub fn new(interval_ms: u64, lease_ms: u64) -> Result<Self, LeaseError> {
        if interval_ms == 0 {
            return Err(LeaseError::ZeroInterval);
        }
        if lease_ms <= interval_ms {
            return Err(LeaseError::TooShort {
                interval_ms,
                lease_ms,
            });
        }
        Ok(Self {
            interval_ms,
            lease_ms,
        })
    }
}

/// What a node says of itself in each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node's stable id (`--name`).
    pub node: String,
    /// The process's start, in ms since the epoch: larger for a restarted node.
    pub incarnation: u64,
    pub roles: Roles,
    /// Where the node's cluster port listens.
    pub addr: String,
    pub memory_used_bytes: u64,
    pub memory_available_bytes: u64,
    /// The shards it hosts, each with the node whose job placed it (absent from a node that
    /// does not say: none).
    #[serde(default)]
    pub shards: Vec<(u32, String)>,
}

/// Whether a node is alive, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    Up,
    /// No heartbeat for longer than the lease.
    Down,
    /// Said it was leaving (a clean stop).
    Left,
}

/// One node in the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub last: Heartbeat,
    pub liveness: Liveness,
    /// When (this node's clock) its last heartbeat arrived.
    pub heard_ms: u64,
    /// Times it was marked down.
    pub downs: u64,
}

/// A change of the table, for the membership actor to act on (a placement to recompute,
/// handles to fail fast, a session to reconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A node heard from for the first time.
    Joined(String),
    /// A node down or left is heard from again, or came back as a new incarnation.
    Up(String),
    /// A node's lease ran out.
    Down(String),
    /// A node said it leaves.
    Left(String),
}

/// The membership table: every node heard from, and whether it is alive.
#[derive(Debug, Clone)]
pub struct Membership {
    lease: Lease,
    members: BTreeMap<String, Member>,
    /// Heartbeats of an incarnation older than the member's, ignored.
    pub stale_heartbeats: u64,
}

impl Membership {
    pub fn new(lease: Lease) -> Self {
        Self {
            lease,
            members: BTreeMap::new(),
            stale_heartbeats: 0,
        }
    }

    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// A heartbeat received at `now_ms`. A node that left comes back only as a new
    /// incarnation: a heartbeat its old process sent before it left may arrive after.
    pub fn heartbeat(&mut self, hb: Heartbeat, now_ms: u64) -> Option<Change> {
        let Some(m) = self.members.get_mut(&hb.node) else {
            let id = hb.node.clone();
            self.members.insert(
                id.clone(),
                Member {
                    last: hb,
                    liveness: Liveness::Up,
                    heard_ms: now_ms,
                    downs: 0,
                },
            );
            return Some(Change::Joined(id));
        };
        if hb.incarnation < m.last.incarnation
            || (m.liveness == Liveness::Left && hb.incarnation == m.last.incarnation)
        {
            self.stale_heartbeats += 1;
            return None;
        }
        let restarted = hb.incarnation > m.last.incarnation;
        let was_up = m.liveness == Liveness::Up;
        m.last = hb;
        m.heard_ms = m.heard_ms.max(now_ms);
        m.liveness = Liveness::Up;
        (!was_up || restarted).then(|| Change::Up(m.last.node.clone()))
    }

    /// A node said it leaves: it is not waited for, and not counted as lost.
    pub fn leave(&mut self, node: &str) -> Option<Change> {
        let m = self.members.get_mut(node)?;
        (m.liveness != Liveness::Left).then(|| {
            m.liveness = Liveness::Left;
            Change::Left(node.to_owned())
        })
    }

    /// The clock's tick at `now_ms` (every `interval`): nodes whose lease ran out are down.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Change> {
        let lease = self.lease.lease_ms;
        self.members
            .values_mut()
            .filter(|m| m.liveness == Liveness::Up && now_ms.saturating_sub(m.heard_ms) > lease)
            .map(|m| {
                m.liveness = Liveness::Down;
                m.downs += 1;
                Change::Down(m.last.node.clone())
            })
            .collect()
    }

    pub fn get(&self, node: &str) -> Option<&Member> {
        self.members.get(node)
    }

    /// Every node heard from, by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The ids of the nodes up with `role`, sorted.
    pub fn up_with(&self, role: Role) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.liveness == Liveness::Up && m.last.roles.has(role))
            .map(|m| m.last.node.clone())
            .collect()
    }
}

/// The delays between attempts to reopen a lost session: exponential from `base_ms` to
/// `max_ms`, each drawn uniformly from its upper half, so that the nodes that lost one peer do
/// not all call it again at the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Backoff {
    /// The delay before attempt `attempt` (0 for the first retry), given a random `draw`.
    pub fn delay_ms(&self, attempt: u32, draw: u64) -> u64 {
        let cap = self
            .base_ms
            .saturating_mul(1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX))
            .min(self.max_ms)
            .max(1);
        let half = cap / 2;
        half + draw % (cap - half + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(node: &str, incarnation: u64) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            incarnation,
            roles: "shards".parse().unwrap(),
            addr: "127.0.0.1:7000".into(),
            memory_used_bytes: 1,
            memory_available_bytes: 2,
            shards: vec![(0, "trainer".into())],
        }
    }

    #[test]
    fn roles_parse_sorted_and_without_repeats_and_bad_ones_are_named() {
        let r: Roles = "trainer, shards,trainer".parse().unwrap();
        assert_eq!(r.to_string(), "shards,trainer");
        assert!(r.has(Role::Shards) && !r.has(Role::Serving));
        assert_eq!(
            "shards,gpu".parse::<Roles>(),
            Err(RoleError::Unknown("gpu".into()))
        );
        assert_eq!(" , ".parse::<Roles>(), Err(RoleError::Empty));
        let read: Roles = serde_json::from_str(r#"["trainer","shards","trainer"]"#).unwrap();
        assert_eq!(read, r);
        assert!(serde_json::from_str::<Roles>("[]").is_err());
        assert!(serde_json::from_str::<Roles>(r#"["gpu"]"#).is_err());
        assert_eq!(Roles::all().to_string(), "shards,trainer,serving,joiner");
    }

    #[test]
    fn a_lease_must_outlast_its_interval() {
        assert_eq!(
            Lease::new(500, 500),
            Err(LeaseError::TooShort {
                interval_ms: 500,
                lease_ms: 500
            })
        );
        assert_eq!(Lease::new(0, 10), Err(LeaseError::ZeroInterval));
        assert!(Lease::new(500, 1500).is_ok());
    }

    /// Heartbeats every 500 ms, a lease of 1,500 ms, ticks every 500 ms: a node silent after
    /// t = 1,000 is down at the first tick past 2,500 (3,000, within lease plus one interval),
    /// and up at its next heartbeat.
    #[test]
    fn a_silent_node_is_down_within_lease_plus_one_interval_and_up_at_its_next_heartbeat() {
        let lease = Lease::new(500, 1500).unwrap();
        let mut m = Membership::new(lease);
        assert_eq!(m.heartbeat(hb("a", 1), 0), Some(Change::Joined("a".into())));
        assert_eq!(m.heartbeat(hb("b", 1), 0), Some(Change::Joined("b".into())));
        let mut downs = Vec::new();
        for t in (500..=5000).step_by(500) {
            m.heartbeat(hb("a", 1), t);
            if t <= 1000 {
                assert_eq!(m.heartbeat(hb("b", 1), t), None);
            }
            for c in m.tick(t) {
                downs.push((t, c));
            }
        }
        assert_eq!(downs, vec![(3000, Change::Down("b".into()))]);
        assert!(3000 - 1000 <= lease.lease_ms + lease.interval_ms);
        assert_eq!(m.up_with(Role::Shards), vec!["a".to_string()]);
        assert_eq!(m.get("b").unwrap().downs, 1);
        assert_eq!(m.heartbeat(hb("b", 1), 5200), Some(Change::Up("b".into())));
        assert_eq!(m.up_with(Role::Shards), vec!["a".to_string(), "b".into()]);
        assert!(m.tick(5500).is_empty());
    }

    #[test]
    fn a_restarted_node_is_a_new_incarnation_and_the_old_ones_late_heartbeats_are_ignored() {
        let mut m = Membership::new(Lease::new(100, 300).unwrap());
        m.heartbeat(hb("a", 10), 0);
        assert_eq!(m.heartbeat(hb("a", 20), 50), Some(Change::Up("a".into())));
        assert_eq!(m.heartbeat(hb("a", 10), 60), None);
        assert_eq!(m.stale_heartbeats, 1);
        assert_eq!(m.get("a").unwrap().last.incarnation, 20);
        // A late heartbeat never moves the time last heard backwards.
        m.heartbeat(hb("a", 20), 40);
        assert_eq!(m.get("a").unwrap().heard_ms, 50);
    }

    #[test]
    fn a_node_that_leaves_is_never_marked_down() {
        let mut m = Membership::new(Lease::new(100, 300).unwrap());
        m.heartbeat(hb("a", 1), 0);
        assert_eq!(m.leave("a"), Some(Change::Left("a".into())));
        assert_eq!(m.leave("a"), None);
        assert_eq!(m.leave("nobody"), None);
        assert!(m.tick(10_000).is_empty());
        assert!(m.up_with(Role::Shards).is_empty());
        // One sent before it left, arriving after: ignored, and never a later "down".
        assert_eq!(m.heartbeat(hb("a", 1), 10_050), None);
        assert!(m.tick(20_000).is_empty());
        assert_eq!(m.get("a").unwrap().downs, 0);
        assert_eq!(
            m.heartbeat(hb("a", 2), 10_100),
            Some(Change::Up("a".into()))
        );
    }

    #[test]
    fn reconnect_delays_grow_to_their_cap_within_their_upper_half() {
        let b = Backoff {
            base_ms: 100,
            max_ms: 5_000,
        };
        for draw in [0, 1, 7, u64::MAX] {
            let d: Vec<u64> = (0..12).map(|a| b.delay_ms(a, draw)).collect();
            for (a, &x) in d.iter().enumerate() {
                let cap = (100u64 << a).min(5_000);
                assert!(x >= cap / 2 && x <= cap, "attempt {a}: {x} ms (cap {cap})");
            }
        }
        assert_eq!(b.delay_ms(u32::MAX, 0), 2_500);
    }
}
