//! The endpoint: the one actor of a node that other nodes send to. It reassembles packets
//! into requests, answers and heartbeats, hands requests to the shard owners the node hosts,
//! and sends their answers back.
//!
//! Architecture invariant: every request that reaches an endpoint is answered, with the
//! owner's answer or with a [`WireAnswer::Fault`] saying why not, even when its frame is
//! malformed, as long as its header still names it (the fault goes to that id). A request
//! lost otherwise fails at its caller after the request timeout.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::protocol::{NodeAnswer, NodeCall, Packet, PacketKind, WireAnswer, WireRequest};
use super::{bump, Shared};
use crate::membership::Heartbeat;
use crate::wire::{self, Frame, Message, Reassembler, Remote};
use freshet_actors::envelope::Envelope;
use freshet_actors::ids::ShardId;
use freshet_actors::shard::{ShardArgs, ShardHandle, ShardRequest};

#[derive(Debug)]
pub struct Endpoint;

pub struct EndpointState {
    shared: Arc<Shared>,
    /// One reassembler per sending node and kind: ids are the sender's.
    reassembly: HashMap<(String, PacketKind), Reassembler>,
    /// The shard owners this node hosts, each with the node (the trainer) that placed it:
    /// only that node may call it or release it.
    hosted: BTreeMap<ShardId, (String, ShardHandle)>,
}

impl std::fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointState")
            .field("hosted", &self.hosted.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Endpoint {
    pub(crate) async fn spawn(shared: Arc<Shared>) -> Result<ActorRef<Packet>, ractor::SpawnErr> {
        let (actor, _join) = Actor::spawn(None, Endpoint, shared).await?;
        Ok(actor)
    }
}

/// Sends `answer` to request `id` of `node`.
fn answer(shared: &Shared, node: &str, id: u64, answer: &WireAnswer) {
    if matches!(answer, WireAnswer::Fault(_)) {
        bump(&shared.stats.faults_sent);
    }
    let sent = shared.send_value(node, PacketKind::Answer, id, "answer", answer);
    if let Err(reason) = sent {
        // The caller's node is gone; its requests fail on its side.
        tracing::warn!(node = %node, id, reason = %reason, "an answer could not be sent");
    }
}

impl Endpoint {
    /// One packet's frame into its reassembler; the whole message when it is complete.
    fn reassemble(
        st: &mut EndpointState,
        from: &str,
        kind: &PacketKind,
        frame: Vec<u8>,
    ) -> Result<Option<(u64, Message)>, String> {
        st.reassembly
            .entry((from.to_owned(), kind.clone()))
            .or_default()
            .push_packet(frame)
            .map_err(|e| e.to_string())
    }

    async fn on_request(st: &mut EndpointState, from: &str, id: u64, bytes: &[u8]) {
        let request: WireRequest = match wire::decode("request", bytes) {
            Ok(r) => r,
            Err(e) => {
                bump(&st.shared.stats.bad_packets);
                tracing::warn!(node = %from, id, error = %e, "a request that does not decode");
                return answer(&st.shared, from, id, &WireAnswer::Fault(e.to_string()));
            }
        };
        bump(&st.shared.stats.requests_served);
        match request {
            WireRequest::Shard { shard, call } => {
                let owner = match st.hosted.get(&shard) {
                    Some((placer, owner)) if placer == from => owner,
                    Some((placer, _)) => {
                        let reason = format!(
                            "shard {shard} on node {} belongs to node {placer}'s job",
                            st.shared.name
                        );
                        return answer(&st.shared, from, id, &WireAnswer::Fault(reason));
                    }
                    None => {
                        let reason =
                            format!("shard {shard} is not hosted on node {}", st.shared.name);
                        return answer(&st.shared, from, id, &WireAnswer::Fault(reason));
                    }
                };
                let Envelope { trace, body } = call;
                let (local, pending) = ShardRequest::from_call(body);
                if let Err(e) = owner
                    .actor()
                    .send_message(Envelope::with_trace(trace, local))
                {
                    let reason = format!("the owner of shard {shard} stopped: {e}");
                    return answer(&st.shared, from, id, &WireAnswer::Fault(reason));
                }
                if let Some(pending) = pending {
                    // The answer goes back without holding up the next request: the owner's
                    // mailbox keeps the order, the answers need not.
                    let shared = st.shared.clone();
                    let from = from.to_owned();
                    tokio::spawn(async move {
                        let a = match pending.answer().await {
                            Ok(a) => WireAnswer::Shard(a),
                            Err(e) => WireAnswer::Fault(format!("shard {shard}: {e}")),
                        };
                        answer(&shared, &from, id, &a);
                    });
                }
            }
            WireRequest::Node(call) => {
                let a = Self::node_call(st, from, call).await;
                answer(&st.shared, from, id, &WireAnswer::Node(a));
            }
        }
    }

    /// Tells the heartbeats what this node hosts now.
    fn publish_hosted(st: &EndpointState) {
        let hosted = st
            .hosted
            .iter()
            .map(|(&s, (p, _))| (s, p.clone()))
            .collect();
        *super::lock(&st.shared.hosted) = hosted;
    }

    /// Stops the owners `placer` placed here; returns how many.
    fn release(st: &mut EndpointState, placer: &str) -> u32 {
        let mine: Vec<ShardId> = (st.hosted.iter())
            .filter(|(_, (p, _))| p == placer)
            .map(|(&s, _)| s)
            .collect();
        for s in &mine {
            if let Some((_, h)) = st.hosted.remove(s) {
                h.actor().stop(Some("released".into()));
            }
        }
        if !mine.is_empty() {
            tracing::info!(node = %placer, shards = mine.len(), "released the shard owners");
            Self::publish_hosted(st);
        }
        mine.len() as u32
    }

    async fn node_call(st: &mut EndpointState, from: &str, call: NodeCall) -> NodeAnswer {
        match call {
            NodeCall::Leave => {
                st.shared.left(from);
                // A job that leaves takes its owners with it.
                Self::release(st, from);
                NodeAnswer::Left
            }
            NodeCall::HostShard {
                shard,
                shard_count,
                tables,
                restore,
            } => {
                if !st.shared.roles.has(crate::membership::Role::Shards) {
                    return NodeAnswer::Refused(format!(
                        "node {} does not have the shards role (it has {})",
                        st.shared.name, st.shared.roles
                    ));
                }
                // Two jobs never share an owner: one placed by a node still up is kept.
                if let Some((placer, _)) = st.hosted.get(&shard) {
                    if placer != from && st.shared.is_up(placer) {
                        return NodeAnswer::Refused(format!(
                            "node {} hosts shard {shard} for node {placer}, which is up",
                            st.shared.name
                        ));
                    }
                }
                if let Some((_, old)) = st.hosted.remove(&shard) {
                    old.actor().stop(Some("placed again".into()));
                }
                // A spill directory only for tables with a DRAM budget, as in one process.
                let spills = tables.iter().any(|(_, c)| c.dram_budget_bytes.is_some());
                let spill_dir = match (&st.shared.spill_dir, spills) {
                    (Some(d), true) => Some(d.join(format!("shard-{shard}"))),
                    _ => None,
                };
                let args = ShardArgs {
                    shard,
                    shard_count,
                    tables,
                    spill_dir,
                    restore: restore.map(|s| *s),
                    faults: Default::default(),
                };
                match ShardHandle::spawn(args).await {
                    Ok((h, _join)) => {
                        tracing::info!(shard, shard_count, "hosting a shard owner");
                        st.hosted.insert(shard, (from.to_owned(), h));
                        Self::publish_hosted(st);
                        NodeAnswer::Hosted
                    }
                    Err(e) => {
                        NodeAnswer::Refused(format!("starting the owner of shard {shard}: {e}"))
                    }
                }
            }
            NodeCall::ReleaseShards => NodeAnswer::Released {
                shards: Self::release(st, from),
            },
        }
    }
}

impl Actor for Endpoint {
    type Msg = Packet;
    type State = EndpointState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Packet>,
        shared: Arc<Shared>,
    ) -> Result<EndpointState, ActorProcessingErr> {
        Ok(EndpointState {
            shared,
            reassembly: HashMap::new(),
            hosted: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Packet>,
        p: Packet,
        st: &mut EndpointState,
    ) -> Result<(), ActorProcessingErr> {
        st.shared
            .stats
            .bytes_received
            .fetch_add(p.frame.len() as u64, Ordering::Relaxed);
        if let PacketKind::Unknown(kind) = &p.kind {
            bump(&st.shared.stats.bad_packets);
            tracing::warn!(node = %p.from, kind = %kind, "a packet of an unknown kind");
            if let Some(id) = Frame::peek_id(&p.frame) {
                let reason = format!("packet kind `{kind}` is not one this node reads");
                answer(&st.shared, &p.from, id, &WireAnswer::Fault(reason));
            }
            return Ok(());
        }
        let Packet { from, kind, frame } = p;
        let peeked = Frame::peek_id(&frame);
        let message = match Self::reassemble(st, &from, &kind, frame) {
            Ok(None) => return Ok(()),
            Ok(Some(m)) => m,
            Err(reason) => {
                bump(&st.shared.stats.bad_packets);
                tracing::warn!(node = %from, kind = ?kind, reason = %reason, "a malformed packet");
                // Answer what can be answered: the request, or the caller waiting on it here.
                if let Some(id) = peeked {
                    match kind {
                        PacketKind::Request => {
                            let fault = WireAnswer::Fault(format!("malformed request: {reason}"));
                            answer(&st.shared, &from, id, &fault);
                        }
                        PacketKind::Answer => st
                            .shared
                            .answered(id, Err(format!("a malformed answer: {reason}"))),
                        PacketKind::Heartbeat | PacketKind::Unknown(_) => {}
                    }
                }
                return Ok(());
            }
        };
        let (id, message) = message;
        let bytes = message.bytes();
        match kind {
            PacketKind::Request => Self::on_request(st, &from, id, bytes).await,
            PacketKind::Answer => {
                let a = wire::decode::<WireAnswer>("answer", bytes).map_err(|e| {
                    bump(&st.shared.stats.bad_packets);
                    format!("an answer that does not decode: {e}")
                });
                st.shared.answered(id, a);
            }
            PacketKind::Heartbeat => match wire::decode::<Heartbeat>("heartbeat", bytes) {
                Ok(hb) if hb.node == from => st.shared.heard(hb),
                Ok(hb) => {
                    bump(&st.shared.stats.bad_packets);
                    tracing::warn!(from = %from, claims = %hb.node, "a heartbeat for another node");
                }
                Err(e) => {
                    bump(&st.shared.stats.bad_packets);
                    tracing::warn!(node = %from, error = %e, "a heartbeat that does not decode");
                }
            },
            PacketKind::Unknown(_) => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Packet>,
        st: &mut EndpointState,
    ) -> Result<(), ActorProcessingErr> {
        for (_, (_, h)) in std::mem::take(&mut st.hosted) {
            h.actor().stop(None);
        }
        Ok(())
    }
}
