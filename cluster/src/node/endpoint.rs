//! The endpoint: the one actor of a node that other nodes send to. It reassembles packets
//! into requests, answers and heartbeats, hands requests to the shard owners the node hosts,
//! and sends their answers back.
//!
//! Architecture invariant: every request that reaches an endpoint is answered, with the
//! owner's answer or with a [`WireAnswer::Fault`] saying why not, even when its frame is
//! malformed, as long as its header still names it (the fault goes to that id). A request
//! lost otherwise fails at its caller after the request timeout.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::protocol::{NodeAnswer, NodeCall, Packet, PacketKind, WireAnswer, WireRequest};
use super::{bump, lock, Hosted, Shared};
use crate::membership::Heartbeat;
use crate::wire::{self, Frame, Message, Reassembler, Remote};
use freshet_actors::envelope::Envelope;
use freshet_actors::ids::ShardId;
use freshet_actors::shard::{ShardArgs, ShardHandle, ShardRequest};

#[derive(Debug)]
pub struct Endpoint;

/// Why a shard request is not served: its placement is stale, or it is not the caller's.
enum Refusal {
    Fenced(String),
    Fault(String),
}

pub struct EndpointState {
    shared: Arc<Shared>,
    /// One reassembler per sending node and kind: ids are the sender's.
    reassembly: HashMap<(String, PacketKind), Reassembler>,
}

impl std::fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosted: Vec<ShardId> = lock(&self.shared.hosted).keys().copied().collect();
        f.debug_struct("EndpointState")
            .field("hosted", &hosted)
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
            WireRequest::Shard { shard, epoch, call } => {
                let owner = match Self::owner_for(&st.shared, from, shard, epoch) {
                    Ok(owner) => owner,
                    Err(Refusal::Fenced(r)) => {
                        return answer(&st.shared, from, id, &WireAnswer::Fenced(r))
                    }
                    Err(Refusal::Fault(r)) => {
                        return answer(&st.shared, from, id, &WireAnswer::Fault(r))
                    }
                };
                let Envelope { trace, body } = call;
                let (local, pending) = ShardRequest::from_call(body);
                if let Err(e) = owner
                    .actor()
                    .send_message(Envelope::with_trace(trace, local))
                {
                    // It failed here (a panic): this node does not restart it, since only its
                    // placer can restore it. Reported as fenced, so that the placer fails
                    // over and places the shard again.
                    let reason = format!(
                        "the owner of shard {shard} on node {} failed: {e}",
                        st.shared.name
                    );
                    Self::owner_failed(&st.shared, shard, &reason);
                    return answer(&st.shared, from, id, &WireAnswer::Fenced(reason));
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
            WireRequest::Node(NodeCall::FetchVersion { version }) => {
                let store = lock(&st.shared.models).clone();
                let shared = st.shared.clone();
                let from = from.to_owned();
                tokio::spawn(async move {
                    let a = super::models::export(store, &shared.name, version).await;
                    answer(&shared, &from, id, &WireAnswer::Node(a));
                });
            }
            WireRequest::Node(call) => {
                let a = Self::node_call(st, from, call).await;
                answer(&st.shared, from, id, &WireAnswer::Node(a));
            }
        }
    }

    /// The owner of `shard` for a request of `from` at placement `epoch`, or the refusal
    /// to answer with. Only the node that placed an owner may call it, and only at the
    /// owner's epoch. A placer this node has lost is fenced here as well as by the heartbeat
    /// loop, so that no request is served between the loss and the loop's next tick.
    fn owner_for(
        shared: &Shared,
        from: &str,
        shard: ShardId,
        epoch: u64,
    ) -> Result<ShardHandle, Refusal> {
        let here = &shared.name;
        if let Some(why) = shared.placer_lost(from) {
            shared.fence(Some(from), &why);
        }
        let hosted = lock(&shared.hosted);
        let fenced = |reason: String| {
            bump(&shared.stats.fenced_requests);
            tracing::info!(node = %from, shard, epoch, reason = %reason, "refused a request of a stale placement");
            Refusal::Fenced(reason)
        };
        match hosted.get(&shard) {
            Some(h) if h.placer == from && h.epoch == epoch => Ok(h.handle.clone()),
            Some(h) if h.placer == from => Err(fenced(format!(
                "shard {shard} on node {here} is at placement epoch {}, the request at {epoch}",
                h.epoch
            ))),
            Some(h) => Err(Refusal::Fault(format!(
                "shard {shard} on node {here} belongs to node {}'s job",
                h.placer
            ))),
            None => Err(fenced(format!(
                "shard {shard} is not hosted on node {here} (its placement epoch {epoch} was \
                 fenced or released)"
            ))),
        }
    }

    /// Takes a failed owner out of what this node hosts, and says so.
    fn owner_failed(shared: &Shared, shard: ShardId, reason: &str) {
        if lock(&shared.hosted).remove(&shard).is_some() {
            bump(&shared.stats.owners_failed);
            tracing::error!(shard, reason = %reason, "a hosted shard owner failed: its placer is told, and places it again");
        }
    }

    /// Stops the owners `placer` placed here; returns how many.
    fn release(st: &mut EndpointState, placer: &str) -> u32 {
        let mine: Vec<Hosted> = {
            let mut hosted = lock(&st.shared.hosted);
            let ids: Vec<ShardId> = (hosted.iter())
                .filter(|(_, h)| h.placer == placer)
                .map(|(&s, _)| s)
                .collect();
            ids.iter().filter_map(|s| hosted.remove(s)).collect()
        };
        for h in &mine {
            h.handle.actor().stop(Some("released".into()));
        }
        if !mine.is_empty() {
            tracing::info!(node = %placer, shards = mine.len(), "released the shard owners");
        }
        mine.len() as u32
    }

    async fn node_call(st: &mut EndpointState, from: &str, call: NodeCall) -> NodeAnswer {
        match call {
            NodeCall::Leave => {
                // A job that leaves takes its owners with it.
                Self::release(st, from);
                st.shared.left(from);
                NodeAnswer::Left
            }
            NodeCall::HostShard {
                shard,
                shard_count,
                epoch,
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
                let old = {
                    let mut hosted = lock(&st.shared.hosted);
                    if let Some(h) = hosted.get(&shard) {
                        if h.placer != from && st.shared.is_up(&h.placer) {
                            return NodeAnswer::Refused(format!(
                                "node {} hosts shard {shard} for node {}, which is up",
                                st.shared.name, h.placer
                            ));
                        }
                    }
                    hosted.remove(&shard)
                };
                if let Some(old) = old {
                    old.handle.actor().stop(Some("placed again".into()));
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
                    faults: st.shared.faults.clone(),
                };
                let stalls = st.shared.stats.stalls.load(Ordering::Relaxed);
                match ShardHandle::spawn(args).await {
                    // A fence that ran while the owner started found nothing to stop: the
                    // placement it is for may be stale already.
                    Ok((h, _join))
                        if st.shared.placer_lost(from).is_some()
                            || st.shared.stats.stalls.load(Ordering::Relaxed) != stalls =>
                    {
                        h.actor().stop(Some("fenced while starting".into()));
                        NodeAnswer::Refused(format!(
                            "node {} fenced shard {shard} while its owner started",
                            st.shared.name
                        ))
                    }
                    Ok((h, _join)) => {
                        tracing::info!(shard, shard_count, epoch, node = %from, "hosting a shard owner");
                        let placer = from.to_owned();
                        let hosted = Hosted {
                            placer,
                            epoch,
                            handle: h,
                        };
                        if let Some(old) = lock(&st.shared.hosted).insert(shard, hosted) {
                            old.handle.actor().stop(Some("placed again".into()));
                        }
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
            NodeCall::Published(p) => {
                if !st.shared.roles.has(crate::membership::Role::Serving) {
                    return NodeAnswer::Refused(format!(
                        "node {} does not have the serving role (it has {})",
                        st.shared.name, st.shared.roles
                    ));
                }
                st.shared.notices.send_replace(Some((from.to_owned(), p)));
                NodeAnswer::Noted
            }
            NodeCall::NewestPublished => match &*lock(&st.shared.models) {
                Some(_) => NodeAnswer::Newest(lock(&st.shared.published).clone()),
                None => {
                    NodeAnswer::Refused(format!("node {} offers no model store", st.shared.name))
                }
            },
            // Answered off the endpoint's task, in `on_request`.
            NodeCall::FetchVersion { version } => NodeAnswer::Refused(format!(
                "version {version}: a fetch is not a call of the node itself"
            )),
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
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Packet>,
        p: Packet,
        st: &mut EndpointState,
    ) -> Result<(), ActorProcessingErr> {
        // Before anything queued during a stall is read.
        st.shared.check_stall();
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
        let hosted = std::mem::take(&mut *lock(&st.shared.hosted));
        for h in hosted.into_values() {
            h.handle.actor().stop(None);
        }
        Ok(())
    }
}
