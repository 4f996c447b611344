//! One Freshet node of a cluster: the `ractor_cluster` node server with its cookie, the
//! endpoint actor that every other node sends to, the heartbeat lease, and calls to other
//! nodes with a bound on what is in flight to each.
//!
//! What `ractor_cluster` gives and what this module adds:
//! - Ractor authenticates sessions with the cookie, but `client_connect` returns before the
//!   handshake. [`ClusterNode::join`] watches the node server's session events and tells a
//!   seed that refused the cookie (opened, then closed unauthenticated) from one that accepted
//!   it; the seed logs the refused peer's address.
//! - Ractor never reconnects and notices a silent peer only when TCP gives up. Each node sends
//!   a [`Heartbeat`] every `lease.interval_ms`; a peer unheard for longer than the lease is
//!   down ([`Membership`]), its calls fail at once, and a lost session is dialled again with
//!   [`Backoff`].
//! - Ractor drops a message it cannot decode. Every packet here is a cast of raw bytes that
//!   ractor always accepts; the frame inside is Freshet's, and one that fails its CRC or does
//!   not decode is counted and answered with a fault (see [`protocol`]).
//! - Remote actors are found through process groups: each node's endpoint joins the group
//!   `node:<name>` in the scope `freshet`, so a node is addressed by its stable `--name`, not
//!   by a per-session `ActorId`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{broadcast, Notify, OwnedSemaphorePermit, Semaphore};

use crate::membership::{Backoff, Change, Heartbeat, Lease, Liveness, Member, Membership, Roles};
use crate::wire;
use freshet_actors::ids::ShardId;

mod endpoint;
pub mod follower;
mod models;
pub mod protocol;
mod remote;
mod tls;

pub use endpoint::Endpoint;
pub use protocol::{NodeAnswer, NodeCall, Packet, PacketKind, Published, WireAnswer, WireRequest};
pub use remote::{ClusterPlacer, RemoteShard};
pub use tls::TlsFiles;

/// The process-group scope of Freshet's endpoints.
const SCOPE: &str = "freshet";

fn group(node: &str) -> String {
    format!("node:{node}")
}

/// How one node joins and talks to the cluster (`freshet node`, `[cluster]`).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The stable node id.
    pub name: String,
    pub roles: Roles,
    /// Where the cluster port listens.
    pub listen: SocketAddr,
    /// Seeds to join at start.
    pub seeds: Vec<String>,
    /// The cluster secret.
    pub cookie: String,
    pub lease: Lease,
    pub reconnect: Backoff,
    /// Requests in flight to one node at most; a caller beyond it waits.
    pub max_in_flight: usize,
    /// How long joining a seed may take before it is given up (the dial included).
    pub join_timeout: Duration,
    /// A request unanswered for this long fails (its node neither answered nor was found
    /// down: an endpoint that stopped, an answer lost).
    pub request_timeout: Duration,
    /// Where hosted shard owners with an on-disk tier spill (one directory per shard).
    pub spill_dir: Option<PathBuf>,
    /// TLS with these files, or plaintext after the handshake.
    pub tls: Option<TlsFiles>,
    /// Fault points armed in the shard owners this node hosts (fault-injection tests of a
    /// whole process; none in production).
    pub faults: freshet_actors::fault::Faults,
}

/// What joining and calling other nodes can fail with; callers act on the case.
#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("the cluster port {addr} cannot be opened: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("seed {seed} cannot be reached: {reason}")]
    Unreachable { seed: String, reason: String },
    #[error(
        "seed {seed} refused authentication: the cluster cookie differs from the seed's, or \
         one side uses TLS and the other does not"
    )]
    AuthRefused { seed: String },
    #[error(
        "the TLS handshake with seed {seed} failed: {reason} (does the seed run without TLS, or \
         with a certificate another CA signed?)"
    )]
    TlsHandshake { seed: String, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("seed {seed} did not finish joining within {secs} s")]
    JoinTimeout { seed: String, secs: u64 },
    #[error("node {node} is unavailable: {reason}")]
    Unavailable { node: String, reason: String },
    #[error("node {node} answered with a fault: {reason}")]
    Fault { node: String, reason: String },
    #[error("starting the node: {0}")]
    Start(String),
}

/// Counters of one node's traffic: its observable state.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub requests_sent: AtomicU64,
    pub answers_received: AtomicU64,
    pub requests_served: AtomicU64,
    /// Packets whose frame failed its checks or did not decode, and packets of an unknown
    /// kind.
    pub bad_packets: AtomicU64,
    /// Faults this node answered with.
    pub faults_sent: AtomicU64,
    /// Faults other nodes answered this node's requests with.
    pub faults_received: AtomicU64,
    /// Calls failed at once because their node was down or its session lost.
    pub failed_fast: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub heartbeats_received: AtomicU64,
    /// Sessions opened to this node that closed without authenticating.
    pub refused_peers: AtomicU64,
    /// The most requests that were in flight to one node at once.
    pub in_flight_peak: AtomicU64,
    /// Hosted owners stopped because their placement could no longer be trusted (see
    /// [`Shared::fence`]).
    pub owners_fenced: AtomicU64,
    /// Shard requests refused because their owner was fenced or is of another epoch.
    pub fenced_requests: AtomicU64,
    /// Times this node found it had not run for longer than its lease.
    pub stalls: AtomicU64,
    /// Hosted owners found stopped (a panic): reported to their placer as fenced.
    pub owners_failed: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A snapshot of [`NodeStats`], for `ctl nodes` and the tests.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeCounters {
    pub requests_sent: u64,
    pub answers_received: u64,
    pub requests_served: u64,
    pub bad_packets: u64,
    pub faults_sent: u64,
    pub faults_received: u64,
    pub failed_fast: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub heartbeats_sent: u64,
    pub heartbeats_received: u64,
    pub refused_peers: u64,
    pub in_flight_peak: u64,
    pub owners_fenced: u64,
    pub fenced_requests: u64,
    pub stalls: u64,
    pub owners_failed: u64,
}

impl NodeStats {
    pub fn counters(&self) -> NodeCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NodeCounters {
            requests_sent: g(&self.requests_sent),
            answers_received: g(&self.answers_received),
            requests_served: g(&self.requests_served),
            bad_packets: g(&self.bad_packets),
            faults_sent: g(&self.faults_sent),
            faults_received: g(&self.faults_received),
            failed_fast: g(&self.failed_fast),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            heartbeats_sent: g(&self.heartbeats_sent),
            heartbeats_received: g(&self.heartbeats_received),
            refused_peers: g(&self.refused_peers),
            in_flight_peak: g(&self.in_flight_peak),
            owners_fenced: g(&self.owners_fenced),
            fenced_requests: g(&self.fenced_requests),
            stalls: g(&self.stalls),
            owners_failed: g(&self.owners_failed),
        }
    }
}

/// What the coordinator's failover acts on: a node it may have placed shards on is lost to
/// it, or this node itself stalled (its peers may have taken it for lost meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// `node` went down (its lease ran out), lost its session, or left.
    Lost { node: String, why: String },
    /// This node did not run for `ms`, longer than its lease.
    Stalled { ms: u64 },
    /// A node with the shards role was heard from for the first time.
    Joined { node: String },
    /// `node` refused a request of placement `epoch` to `shard` as fenced: that placement
    /// is no longer served there (the node lost this one, stalled, or its owner failed).
    Fenced {
        node: String,
        shard: ShardId,
        epoch: u64,
        why: String,
    },
}

/// A shard owner this node hosts: the node that placed it, and its placement's epoch.
pub(crate) struct Hosted {
    pub(crate) placer: String,
    pub(crate) epoch: u64,
    pub(crate) handle: freshet_actors::shard::ShardHandle,
}

/// Where a call's answer goes: the outcome is an answer, or why none will come.
type Done = Box<dyn FnOnce(Result<WireAnswer, String>) + Send>;

/// A request sent and not yet answered.
struct Waiting {
    node: String,
    /// When it was sent (`Shared::now_ms`).
    sent_ms: u64,
    done: Done,
    /// Held until the answer: the node's in-flight bound.
    _permit: OwnedSemaphorePermit,
}

/// A session event from the node server, as [`ClusterNode::join`] and the log read it.
#[derive(Debug, Clone)]
struct SessionEvent {
    kind: SessionKind,
    node_id: u64,
    peer_addr: String,
    is_server: bool,
    /// The peer's node name, once it said it.
    peer: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionKind {
    Opened,
    Authenticated,
    Ready,
    Disconnected,
}

struct Events(broadcast::Sender<SessionEvent>);

impl Events {
    fn send(&self, kind: SessionKind, ses: ractor_cluster::node::NodeServerSessionInformation) {
        // Ractor's session name is `name@host`; Freshet's node id is the name.
        let peer = ses
            .peer_name
            .map(|p| p.name.split('@').next().unwrap_or_default().to_owned());
        // No receiver is normal between joins.
        let _ = self.0.send(SessionEvent {
            kind,
            node_id: ses.node_id,
            peer_addr: ses.peer_addr,
            is_server: ses.is_server,
            peer,
        });
    }
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        self.send(SessionKind::Opened, ses)
    }
    fn node_session_disconnected(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        self.send(SessionKind::Disconnected, ses)
    }
    fn node_session_authenticated(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        self.send(SessionKind::Authenticated, ses)
    }
    fn node_session_ready(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        self.send(SessionKind::Ready, ses)
    }
}

/// What the endpoint, the callers and the heartbeat loop of one node share (opaque outside
/// this module).
pub struct Shared {
    name: String,
    roles: Roles,
    addr: String,
    incarnation: u64,
    max_in_flight: usize,
    request_timeout_ms: u64,
    spill_dir: Option<PathBuf>,
    pub(crate) faults: freshet_actors::fault::Faults,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Waiting>>,
    /// The in-flight bound of each node; closed (failing its waiters) when the node goes down.
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    membership: Mutex<Membership>,
    /// Nodes whose last session closed, until a new one is ready. Ractor takes a lost
    /// session's actors out of the process groups a moment after it reports the loss, and a
    /// message sent to one in between goes nowhere.
    disconnected: Mutex<std::collections::HashSet<String>>,
    /// Signalled on every heartbeat received.
    heard: Notify,
    /// The shard owners this node hosts. The endpoint adds them; [`Shared::fence`] may take
    /// them away from any task.
    pub(crate) hosted: Mutex<BTreeMap<ShardId, Hosted>>,
    /// When this node last ran (`now_ms`), to find a stall longer than the lease.
    alive_ms: AtomicU64,
    lease_ms: u64,
    /// A gap longer than this is a stall: the lease less one heartbeat interval, since a peer
    /// may last have heard this node up to an interval before its last check.
    stall_ms: u64,
    /// Lost nodes and stalls, for the coordinator's failover.
    changes: broadcast::Sender<NodeEvent>,
    /// The trainer node's model store, offered to serving nodes ([`ClusterNode::offer_models`]).
    pub(crate) models: Mutex<Option<freshet_actors::ckpt::ModelStore>>,
    /// The trainer node's last publication, and the sequence of the next.
    pub(crate) published: Mutex<Option<protocol::Published>>,
    pub(crate) publish_seq: AtomicU64,
    /// On a serving node: the last notice of publication, and the node it came from.
    pub(crate) notices: tokio::sync::watch::Sender<Option<(String, protocol::Published)>>,
    /// Kept for the memory figures of heartbeats.
    system: Mutex<sysinfo::System>,
    pub(crate) stats: NodeStats,
    started: Instant,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("name", &self.name).finish()
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (each critical section
/// is one map operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The endpoint of node `node`, if a session to it is open.
    fn endpoint_of(&self, node: &str) -> Option<ActorRef<Packet>> {
        ractor::pg::get_scoped_members(&SCOPE.to_owned(), &group(node))
            .into_iter()
            .find(|c| !c.get_id().is_local())
            .map(ActorRef::from)
    }

    /// Why a request to `node` cannot go now, if it cannot.
    fn unreachable(&self, node: &str) -> Option<String> {
        if lock(&self.disconnected).contains(node) {
            return Some(format!("node {node} lost its session"));
        }
        (!self.is_up(node)).then(|| format!("node {node} is down"))
    }

    fn session_open(&self, node: &str) -> bool {
        !lock(&self.disconnected).contains(node) && self.endpoint_of(node).is_some()
    }

    fn is_up(&self, node: &str) -> bool {
        lock(&self.membership)
            .get(node)
            .is_some_and(|m| m.liveness == Liveness::Up)
    }

    /// Sends `value` to `node` as packets of `kind`, message `id`. Returns the bytes sent.
    fn send_value<T: Serialize>(
        &self,
        node: &str,
        kind: PacketKind,
        id: u64,
        what: &'static str,
        value: &T,
    ) -> Result<u64, String> {
        let frames = wire::encode_frames(what, id, value, protocol::PACKET_CHUNK)
            .map_err(|e| e.to_string())?;
        self.send_frames(node, kind, frames)
    }

    /// Sends encoded frames to `node` as packets of `kind`. Returns the bytes sent.
    fn send_frames(
        &self,
        node: &str,
        kind: PacketKind,
        frames: Vec<Vec<u8>>,
    ) -> Result<u64, String> {
        let to = self
            .endpoint_of(node)
            .ok_or_else(|| format!("no session to node {node}"))?;
        let mut bytes = 0;
        for frame in frames {
            bytes += frame.len() as u64;
            to.send_message(Packet {
                from: self.name.clone(),
                kind: kind.clone(),
                frame,
            })
            .map_err(|e| format!("sending to node {node}: {e}"))?;
        }
        self.stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Sends a request to `node`; `done` gets its answer, or why none will come. Waits while
    /// `max_in_flight` requests to `node` are unanswered: a slow node slows its callers
    /// rather than growing a queue.
    pub(crate) async fn request(&self, node: &str, request: &WireRequest, done: Done) {
        let fail = |done: Done, reason: String| {
            bump(&self.stats.failed_fast);
            done(Err(reason));
        };
        if let Some(reason) = self.unreachable(node) {
            return fail(done, reason);
        }
        // Encoded before it waits for a permit: a large request (a shard's snapshot) does not
        // spend its timeout encoding, and one that cannot be encoded never counts as sent.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frames = match wire::encode_frames("request", id, request, protocol::PACKET_CHUNK) {
            Ok(f) => f,
            Err(e) => return done(Err(e.to_string())),
        };
        let permits = lock(&self.permits)
            .entry(node.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_in_flight)))
            .clone();
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return fail(done, format!("node {node} went down"));
        };
        let in_flight = (self.max_in_flight - permits.available_permits()) as u64;
        self.stats
            .in_flight_peak
            .fetch_max(in_flight, Ordering::Relaxed);
        lock(&self.pending).insert(
            id,
            Waiting {
                node: node.to_owned(),
                sent_ms: self.now_ms(),
                done,
                _permit: permit,
            },
        );
        // The node may have gone down between the check above and the insert, after its
        // waiting requests were failed: this one must not wait for an answer that will not
        // come.
        if let Some(reason) = self.unreachable(node) {
            let waiting = lock(&self.pending).remove(&id);
            if let Some(w) = waiting {
                fail(w.done, reason);
            }
            return;
        }
        bump(&self.stats.requests_sent);
        if let Err(reason) = self.send_frames(node, PacketKind::Request, frames) {
            let waiting = lock(&self.pending).remove(&id);
            if let Some(w) = waiting {
                fail(w.done, reason);
            }
        }
    }

    /// An answer (or fault) to request `id` arrived.
    fn answered(&self, id: u64, answer: Result<WireAnswer, String>) {
        let Some(w) = lock(&self.pending).remove(&id) else {
            // The request was already failed (its node went down) and the answer is late.
            tracing::debug!(id, "an answer to a request no longer waited for");
            return;
        };
        match &answer {
            Ok(WireAnswer::Fault(_) | WireAnswer::Fenced(_)) | Err(_) => {
                bump(&self.stats.faults_received)
            }
            Ok(_) => bump(&self.stats.answers_received),
        }
        (w.done)(answer);
    }

    /// `node` is down or its session lost: every request waiting on it fails now, and so do
    /// callers waiting for an in-flight slot.
    fn fail_node(&self, node: &str, reason: &str) {
        if let Some(s) = lock(&self.permits).remove(node) {
            s.close();
        }
        let failed: Vec<Waiting> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, w)| w.node == node)
                .map(|(&id, _)| id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id))
                .collect()
        };
        for w in failed {
            bump(&self.stats.failed_fast);
            (w.done)(Err(format!("node {node} {reason}")));
        }
    }

    /// Fails the requests unanswered for longer than the request timeout.
    fn expire(&self) {
        let now = self.now_ms();
        let late: Vec<(u64, Waiting)> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = (pending.iter())
                .filter(|(_, w)| now.saturating_sub(w.sent_ms) > self.request_timeout_ms)
                .map(|(&id, _)| id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id).map(|w| (id, w)))
                .collect()
        };
        for (id, w) in late {
            bump(&self.stats.failed_fast);
            tracing::warn!(node = %w.node, id, "a request timed out");
            (w.done)(Err(format!(
                "node {} did not answer within {} ms",
                w.node, self.request_timeout_ms
            )));
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        let (used, available) = memory(&mut lock(&self.system));
        Heartbeat {
            node: self.name.clone(),
            incarnation: self.incarnation,
            roles: self.roles.clone(),
            addr: self.addr.clone(),
            memory_used_bytes: used,
            memory_available_bytes: available,
            shards: (lock(&self.hosted).iter())
                .map(|(&s, h)| (s, h.placer.clone()))
                .collect(),
        }
    }

    /// The nodes with an open session to this one.
    fn peers(&self) -> Vec<String> {
        ractor::pg::which_scoped_groups(&SCOPE.to_owned())
            .into_iter()
            .filter_map(|g| g.strip_prefix("node:").map(str::to_owned))
            .filter(|n| *n != self.name && self.endpoint_of(n).is_some())
            .collect()
    }

    /// Sends one heartbeat, read once, to each of `nodes`.
    fn send_heartbeat_to(&self, nodes: &[String]) {
        if nodes.is_empty() {
            return;
        }
        let hb = self.heartbeat();
        for node in nodes {
            match self.send_value(node, PacketKind::Heartbeat, 0, "heartbeat", &hb) {
                Ok(_) => bump(&self.stats.heartbeats_sent),
                Err(e) => tracing::debug!(node = %node, error = %e, "heartbeat not sent"),
            }
        }
    }

    /// `node` said it stops.
    fn left(&self, node: &str) {
        let change = lock(&self.membership).leave(node);
        if let Some(c) = change {
            log_change(&c);
        }
        self.lost(node, "left");
    }

    /// `node` is lost to this one (`why`: "left", "lost its session", "is down: ..."): its
    /// waiting requests fail, the owners it placed here are fenced, and the failover hears.
    fn lost(&self, node: &str, why: &str) {
        self.fail_node(node, why);
        self.fence(Some(node), &format!("node {node} {why}"));
        // No subscriber is normal: only a coordinator listens.
        let _ = self.changes.send(NodeEvent::Lost {
            node: node.to_owned(),
            why: why.to_owned(),
        });
    }

    /// Stops the owners `placer` placed here (every owner, for `None`); they answer no more
    /// requests. A placement is fenced when this node can no longer be sure it is current:
    /// its placer may have placed the shards elsewhere meanwhile, and a push that arrives late
    /// (queued while this node was stopped, or cut off) must not be applied.
    pub(crate) fn fence(&self, placer: Option<&str>, why: &str) {
        let fenced: Vec<(ShardId, Hosted)> = {
            let mut hosted = lock(&self.hosted);
            let ids: Vec<ShardId> = (hosted.iter())
                .filter(|(_, h)| placer.is_none_or(|p| h.placer == p))
                .map(|(&s, _)| s)
                .collect();
            ids.into_iter()
                .filter_map(|s| hosted.remove(&s).map(|h| (s, h)))
                .collect()
        };
        if fenced.is_empty() {
            return;
        }
        for (_, h) in &fenced {
            h.handle.actor().stop(Some("fenced".into()));
        }
        self.stats
            .owners_fenced
            .fetch_add(fenced.len() as u64, Ordering::Relaxed);
        let shards: Vec<ShardId> = fenced.iter().map(|(s, _)| *s).collect();
        let epochs: Vec<u64> = fenced.iter().map(|(_, h)| h.epoch).collect();
        tracing::warn!(?shards, ?epochs, reason = %why, "fenced the shard owners: they answer no more requests until placed again");
    }

    /// Why the owners `placer` placed here must not serve it now, if they must not: it is
    /// down or left, or its session closed. A placer not heard from yet is not lost.
    pub(crate) fn placer_lost(&self, placer: &str) -> Option<String> {
        if lock(&self.disconnected).contains(placer) {
            return Some(format!("node {placer} lost its session"));
        }
        match lock(&self.membership).get(placer).map(|m| m.liveness) {
            Some(Liveness::Down) => Some(format!("node {placer} is down")),
            Some(Liveness::Left) => Some(format!("node {placer} left")),
            _ => None,
        }
    }

    /// Records that this node runs now. After a gap longer than the lease less one interval
    /// (a SIGSTOP, a frozen machine) a peer may have taken this node for lost and a placer
    /// may have placed its shards elsewhere: every hosted owner is fenced before anything
    /// that was queued meanwhile is read, and the failover hears. Called by the endpoint
    /// before each packet and by the heartbeat loop at each tick, so whichever runs first
    /// after a stall finds it.
    pub(crate) fn check_stall(&self) {
        let now = self.now_ms();
        let gap = now.saturating_sub(self.alive_ms.swap(now, Ordering::AcqRel));
        if gap <= self.stall_ms {
            return;
        }
        bump(&self.stats.stalls);
        tracing::warn!(
            gap_ms = gap,
            lease_ms = self.lease_ms,
            "this node did not run for longer than its lease allows: its peers may have taken it for lost"
        );
        let why = format!("node {} did not run for {gap} ms", self.name);
        self.fence(None, &why);
        let _ = self.changes.send(NodeEvent::Stalled { ms: gap });
    }

    /// A heartbeat arrived from another node.
    fn heard(&self, hb: Heartbeat) {
        bump(&self.stats.heartbeats_received);
        let hosts = hb.roles.has(crate::membership::Role::Shards);
        let change = lock(&self.membership).heartbeat(hb, self.now_ms());
        if let Some(c) = change {
            log_change(&c);
            if let (Change::Joined(node), true) = (&c, hosts) {
                let _ = self.changes.send(NodeEvent::Joined { node: node.clone() });
            }
        }
        self.heard.notify_waiters();
    }
}

fn log_change(c: &Change) {
    match c {
        Change::Joined(n) => tracing::info!(node = %n, "node joined"),
        Change::Up(n) => tracing::info!(node = %n, "node up"),
        Change::Down(n) => tracing::warn!(node = %n, "node down: its heartbeat lease ran out"),
        Change::Left(n) => tracing::info!(node = %n, "node left"),
    }
}

/// This process's resident memory and the machine's available memory, in bytes, now.
pub fn memory_now() -> (u64, u64) {
    memory(&mut sysinfo::System::new())
}

/// This process's resident memory and the machine's available memory, in bytes (zero where
/// the system does not say). `sys` is kept between calls: a refresh then reads only these.
fn memory(sys: &mut sysinfo::System) -> (u64, u64) {
    use sysinfo::{MemoryRefreshKind, ProcessRefreshKind, ProcessesToUpdate};
    sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let rss = match sysinfo::get_current_pid() {
        Ok(pid) => {
            sys.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_memory(),
            );
            sys.process(pid).map_or(0, |p| p.memory())
        }
        Err(_) => 0,
    };
    (rss, sys.available_memory())
}

/// One node, started: its server listens, its endpoint is registered, heartbeats go out.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    shared: Arc<Shared>,
    server: ActorRef<NodeServerMessage>,
    endpoint: ActorRef<Packet>,
    events: broadcast::Sender<SessionEvent>,
    tls: Option<tls::Tls>,
}

/// Opens a session to `addr`, in TLS when the node has it. Returns before ractor's
/// authentication: the session events tell how it went.
async fn dial(
    server: &ActorRef<NodeServerMessage>,
    addr: &str,
    tls: Option<&tls::Tls>,
) -> Result<(), ClusterError> {
    let unreachable = |reason: String| ClusterError::Unreachable {
        seed: addr.to_owned(),
        reason,
    };
    let Some(tls) = tls else {
        return ractor_cluster::client_connect(server, addr)
            .await
            .map_err(|e| unreachable(e.to_string()));
    };
    let name = tls::server_name(addr).map_err(unreachable)?;
    match ractor_cluster::client_connect_enc(server, addr, tls.connector.clone(), name).await {
        Ok(()) => Ok(()),
        Err(ractor_cluster::ClientConnectErr::Encryption(e)) => Err(ClusterError::TlsHandshake {
            seed: addr.to_owned(),
            reason: e.to_string(),
        }),
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// A node's row in `ctl nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    pub node: String,
    pub roles: String,
    pub state: Liveness,
    pub addr: String,
    /// Since its last heartbeat; none for this node itself.
    pub heard_ms_ago: Option<u64>,
    /// Whether a session to it is open now: a closed one fails calls to it at once, before
    /// its lease runs out and it is marked down.
    pub session: bool,
    pub memory_used_bytes: u64,
    pub memory_available_bytes: u64,
    /// The shards it hosts.
    pub shards: Vec<HostedShard>,
}

/// A shard owner a node hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostedShard {
    pub shard: ShardId,
    /// The node whose job placed it.
    pub placed_by: String,
}

impl HostedShard {
    fn rows(hosted: &[(ShardId, String)]) -> Vec<Self> {
        (hosted.iter())
            .map(|(shard, by)| HostedShard {
                shard: *shard,
                placed_by: by.clone(),
            })
            .collect()
    }
}

impl ClusterNode {
    /// Starts the node server on `cfg.listen` with the cookie, the endpoint and the heartbeat
    /// loop. Joining seeds is [`ClusterNode::join`].
    pub async fn start(cfg: &NodeConfig) -> Result<Self, ClusterError> {
        // Other nodes dial the address this one announces, so it must be one they can reach.
        if cfg.listen.ip().is_unspecified() {
            return Err(ClusterError::Listen {
                addr: cfg.listen,
                reason: "an unspecified address (0.0.0.0 or ::) cannot be dialled by other \
                         nodes; listen on the address they reach this node at"
                    .into(),
            });
        }
        // Bind here first: ractor's listener reports a taken port only in its log.
        let probe = std::net::TcpListener::bind(cfg.listen).map_err(|e| ClusterError::Listen {
            addr: cfg.listen,
            reason: e.to_string(),
        })?;
        let listen = probe.local_addr().map_err(|e| ClusterError::Listen {
            addr: cfg.listen,
            reason: e.to_string(),
        })?;
        drop(probe);
        let tls = cfg.tls.as_ref().map(tls::Tls::load).transpose()?;
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            roles: cfg.roles.clone(),
            addr: listen.to_string(),
            incarnation,
            max_in_flight: cfg.max_in_flight.max(1),
            request_timeout_ms: cfg.request_timeout.as_millis().max(1) as u64,
            spill_dir: cfg.spill_dir.clone(),
            faults: cfg.faults.clone(),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            permits: Mutex::new(HashMap::new()),
            membership: Mutex::new(Membership::new(cfg.lease)),
            disconnected: Mutex::new(std::collections::HashSet::new()),
            heard: Notify::new(),
            hosted: Mutex::new(BTreeMap::new()),
            alive_ms: AtomicU64::new(0),
            lease_ms: cfg.lease.lease_ms,
            stall_ms: cfg.lease.lease_ms - cfg.lease.interval_ms,
            changes: broadcast::channel(64).0,
            models: Mutex::new(None),
            published: Mutex::new(None),
            publish_seq: AtomicU64::new(incarnation.saturating_mul(1000)),
            notices: tokio::sync::watch::channel(None).0,
            system: Mutex::new(sysinfo::System::new()),
            stats: NodeStats::default(),
            started: Instant::now(),
        });
        let server = NodeServer::new(
            listen.port(),
            cfg.cookie.clone(),
            cfg.name.clone(),
            listen.ip().to_string(),
            tls.as_ref()
                .map(|t| ractor_cluster::IncomingEncryptionMode::Tls(t.acceptor.clone())),
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(listen.ip());
        let (server, _join) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| ClusterError::Start(format!("the node server: {e}")))?;
        let (events, _) = broadcast::channel(256);
        server
            .send_message(NodeServerMessage::SubscribeToEvents {
                id: "freshet".into(),
                subscription: Box::new(Events(events.clone())),
            })
            .map_err(|e| ClusterError::Start(format!("subscribing to sessions: {e}")))?;
        let endpoint = Endpoint::spawn(shared.clone())
            .await
            .map_err(|e| ClusterError::Start(format!("the endpoint: {e}")))?;
        ractor::pg::join_scoped(
            SCOPE.to_owned(),
            group(&cfg.name),
            vec![endpoint.get_cell()],
        );
        let node = Self {
            shared,
            server,
            endpoint,
            events,
            tls,
        };
        node.spawn_session_log();
        node.spawn_heartbeats(cfg.reconnect);
        let tls = if node.tls.is_some() { "on" } else { "off" };
        tracing::info!(node = %cfg.name, addr = %listen, roles = %cfg.roles, tls, "cluster port open");
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address the cluster port listens on.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    pub fn stats(&self) -> NodeCounters {
        self.shared.stats.counters()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Lost nodes and stalls of this node, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.changes.subscribe()
    }

    /// Whether a call to `node` can go now: it is up and a session to it is open.
    pub fn reachable(&self, node: &str) -> bool {
        self.shared.unreachable(node).is_none() && self.shared.endpoint_of(node).is_some()
    }

    /// Waits up to `within` for a heartbeat to arrive (any node's); false on timeout.
    pub async fn heard_within(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.shared.heard.notified())
            .await
            .is_ok()
    }

    /// How long a node may go unheard before it is marked down.
    pub fn lease_ms(&self) -> u64 {
        self.shared.lease_ms
    }

    /// Logs the peers that opened a session here and closed it unauthenticated (a wrong
    /// cookie, or plaintext against TLS), and fails the requests of a lost session.
    fn spawn_session_log(&self) {
        let mut rx = self.events.subscribe();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut authenticated = std::collections::HashSet::new();
            // Per peer, its authenticated sessions: ractor keeps one per pair of nodes and
            // closes the other, so a peer is lost only when its last one closes.
            let mut sessions: HashMap<String, std::collections::HashSet<u64>> = HashMap::new();
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "session events missed");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                match ev.kind {
                    SessionKind::Authenticated => {
                        authenticated.insert(ev.node_id);
                        if let Some(peer) = &ev.peer {
                            sessions.entry(peer.clone()).or_default().insert(ev.node_id);
                        }
                    }
                    SessionKind::Disconnected if !authenticated.remove(&ev.node_id) => {
                        if ev.is_server {
                            bump(&shared.stats.refused_peers);
                            tracing::warn!(
                                peer = %ev.peer_addr,
                                "refused a node that did not authenticate: a wrong cluster \
                                 cookie, or plaintext against TLS"
                            );
                        }
                    }
                    SessionKind::Disconnected => {
                        let Some(peer) = &ev.peer else { continue };
                        let others = sessions.get_mut(peer).map_or(0, |s| {
                            s.remove(&ev.node_id);
                            s.len()
                        });
                        let left = lock(&shared.membership)
                            .get(peer)
                            .is_some_and(|m| m.liveness == Liveness::Left);
                        if left {
                            tracing::debug!(node = %peer, "session closed after the node left");
                        } else if others > 0 {
                            tracing::debug!(node = %peer, "a second session closed");
                        } else {
                            tracing::warn!(node = %peer, addr = %ev.peer_addr, "session lost");
                            lock(&shared.disconnected).insert(peer.clone());
                            shared.lost(peer, "lost its session");
                        }
                    }
                    // A new peer hears from this node at once, not an interval later: a short
                    // job's leave then finds it known.
                    SessionKind::Ready => {
                        if let Some(peer) = &ev.peer {
                            sessions.entry(peer.clone()).or_default().insert(ev.node_id);
                            lock(&shared.disconnected).remove(peer);
                            shared.send_heartbeat_to(std::slice::from_ref(peer));
                        }
                    }
                    SessionKind::Opened => {}
                }
            }
        });
    }

    /// Every `interval`: a heartbeat to each node with a session, the lease checked, and
    /// nodes heard from but without a session dialled again with backoff.
    fn spawn_heartbeats(&self, backoff: Backoff) {
        let shared = self.shared.clone();
        let server = self.server.clone();
        let tls = self.tls.clone();
        let lease = lock(&shared.membership).lease();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(lease.interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Per node: attempts so far and when the next may start.
            let mut redial: BTreeMap<String, (u32, u64)> = BTreeMap::new();
            let mut draw = shared.incarnation;
            loop {
                tick.tick().await;
                shared.check_stall();
                shared.send_heartbeat_to(&shared.peers());
                shared.expire();
                let now = shared.now_ms();
                let (changes, lost): (Vec<Change>, Vec<(String, String)>) = {
                    let mut m = lock(&shared.membership);
                    let changes = m.tick(now);
                    // Only nodes that host state are dialled again: a trainer listens on a
                    // port of the moment and dials its shard nodes itself.
                    let lost = m
                        .members()
                        .filter(|m| m.liveness != Liveness::Left)
                        .filter(|m| m.last.roles.has(crate::membership::Role::Shards))
                        .filter(|m| shared.endpoint_of(&m.last.node).is_none())
                        .map(|m| (m.last.node.clone(), m.last.addr.clone()))
                        .collect();
                    (changes, lost)
                };
                for c in &changes {
                    log_change(c);
                    if let Change::Down(n) = c {
                        shared.lost(n, "is down: its heartbeat lease ran out");
                    }
                }
                redial.retain(|n, _| lost.iter().any(|(l, _)| l == n));
                for (node, addr) in lost {
                    let (attempt, due) = redial.entry(node.clone()).or_insert((0, 0));
                    if now < *due {
                        continue;
                    }
                    draw = draw
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *due = now + backoff.delay_ms(*attempt, draw >> 11);
                    *attempt += 1;
                    tracing::info!(node = %node, addr = %addr, attempt = *attempt, "reconnecting");
                    let server = server.clone();
                    let tls = tls.clone();
                    let within = Duration::from_millis(backoff.max_ms.max(1000));
                    tokio::spawn(async move {
                        match tokio::time::timeout(within, dial(&server, &addr, tls.as_ref())).await
                        {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::debug!(node = %node, error = %e, "reconnect failed")
                            }
                            Err(_) => tracing::debug!(node = %node, "reconnect timed out"),
                        }
                    });
                }
            }
        });
    }

    /// Joins `seed`: a session is opened and authenticated, and the seed's first heartbeat
    /// is in. A seed that refuses the cookie is an error naming it, never a retry.
    pub async fn join(&self, seed: &str, timeout: Duration) -> Result<String, ClusterError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let unreachable = |reason: String| ClusterError::Unreachable {
            seed: seed.to_owned(),
            reason,
        };
        let timed_out = || ClusterError::JoinTimeout {
            seed: seed.to_owned(),
            secs: timeout.as_secs(),
        };
        let addr: SocketAddr = tokio::time::timeout_at(deadline, tokio::net::lookup_host(seed))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("the name has no address".into()))?;
        let mut rx = self.events.subscribe();
        // Dialled as given, so that a TLS seed is checked against its host name.
        let dialled =
            tokio::time::timeout_at(deadline, dial(&self.server, seed, self.tls.as_ref()));
        dialled
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| match e {
                ClusterError::Unreachable { reason, .. } => unreachable(reason),
                ClusterError::TlsHandshake { reason, .. } => ClusterError::TlsHandshake {
                    seed: seed.to_owned(),
                    reason,
                },
                other => other,
            })?;
        let want = addr.to_string();
        // The first session to this address after the dial is ours.
        let mut session = None;
        let mut authenticated = false;
        let peer = loop {
            let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(ClusterError::Start("the node server stopped".into()))
                }
                Ok(Ok(ev)) => ev,
            };
            if ev.is_server || ev.peer_addr != want {
                continue;
            }
            if *session.get_or_insert(ev.node_id) != ev.node_id {
                continue;
            }
            match ev.kind {
                SessionKind::Opened => {}
                SessionKind::Authenticated => authenticated = true,
                SessionKind::Ready => match ev.peer {
                    Some(p) => break p,
                    None => return Err(unreachable("the seed sent no node name".into())),
                },
                SessionKind::Disconnected if authenticated => {
                    return Err(unreachable("the session closed while joining".into()))
                }
                SessionKind::Disconnected => {
                    return Err(ClusterError::AuthRefused {
                        seed: seed.to_owned(),
                    })
                }
            }
        };
        // Ready: the process groups are exchanged; wait for the seed's first heartbeat.
        loop {
            let heard = self.shared.heard.notified();
            if self.shared.is_up(&peer) {
                tracing::info!(seed = %seed, node = %peer, "joined");
                return Ok(peer);
            }
            if tokio::time::timeout_at(deadline, heard).await.is_err() {
                return Err(timed_out());
            }
        }
    }

    /// Every node heard from, and this one.
    pub fn nodes(&self) -> Vec<NodeRow> {
        let me = self.shared.heartbeat();
        let mut rows = vec![NodeRow {
            node: me.node,
            roles: me.roles.to_string(),
            state: Liveness::Up,
            addr: me.addr,
            heard_ms_ago: None,
            session: true,
            memory_used_bytes: me.memory_used_bytes,
            memory_available_bytes: me.memory_available_bytes,
            shards: HostedShard::rows(&me.shards),
        }];
        let now = self.shared.now_ms();
        let members: Vec<Member> = lock(&self.shared.membership).members().cloned().collect();
        rows.extend(members.iter().map(|m: &Member| NodeRow {
            node: m.last.node.clone(),
            roles: m.last.roles.to_string(),
            state: m.liveness,
            addr: m.last.addr.clone(),
            heard_ms_ago: Some(now.saturating_sub(m.heard_ms)),
            session: self.shared.session_open(&m.last.node),
            memory_used_bytes: m.last.memory_used_bytes,
            memory_available_bytes: m.last.memory_available_bytes,
            shards: HostedShard::rows(&m.last.shards),
        }));
        rows
    }

    /// The nodes up with `role`, sorted.
    pub fn up_with(&self, role: crate::membership::Role) -> Vec<String> {
        lock(&self.shared.membership).up_with(role)
    }

    /// Sends `call` to `node` itself and waits for its answer.
    pub async fn call_node(&self, node: &str, call: NodeCall) -> Result<NodeAnswer, ClusterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared
            .request(
                node,
                &WireRequest::Node(call),
                Box::new(move |a| {
                    let _ = tx.send(a);
                }),
            )
            .await;
        let unavailable = |reason: String| ClusterError::Unavailable {
            node: node.to_owned(),
            reason,
        };
        match rx.await {
            Ok(Ok(WireAnswer::Node(a))) => Ok(a),
            Ok(Ok(WireAnswer::Fault(reason) | WireAnswer::Fenced(reason))) => {
                Err(ClusterError::Fault {
                    node: node.to_owned(),
                    reason,
                })
            }
            Ok(Ok(other)) => Err(ClusterError::Fault {
                node: node.to_owned(),
                reason: format!("answered a node call with {other:?}"),
            }),
            Ok(Err(reason)) => Err(unavailable(reason)),
            Err(_) => Err(unavailable("the answer was dropped".into())),
        }
    }

    /// Tells every node with a session that this one leaves (each answers, or is given up
    /// after a second), then stops the endpoint and the server.
    pub async fn leave(&self) {
        for p in self.shared.peers() {
            let said =
                tokio::time::timeout(Duration::from_secs(1), self.call_node(&p, NodeCall::Leave));
            if !matches!(said.await, Ok(Ok(NodeAnswer::Left))) {
                tracing::debug!(node = %p, "did not acknowledge the leave");
            }
        }
        self.stop();
    }

    /// Stops the endpoint and the server at once.
    pub fn stop(&self) {
        self.endpoint.stop(None);
        self.server.stop(None);
    }
}
