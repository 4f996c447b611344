//! What nodes say to each other: [`Packet`]s between endpoints, and the requests and answers
//! inside them.
//!
//! `ractor_cluster` authenticates the session and carries each packet as one cast to the peer
//! node's endpoint actor. Everything inside a packet is Freshet's own wire encoding (a
//! [`Frame`](crate::wire::Frame) with its CRC): a packet that ractor delivers but Freshet
//! cannot read is still answered, to the id in its frame header, with [`WireAnswer::Fault`].
//! Ractor's own decoding never fails on a packet ([`Packet::deserialize`] takes any cast), so
//! no message is dropped below Freshet's sight.

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use serde::{Deserialize, Serialize};

use crate::wire::{ShardAnswer, ShardCall};
use freshet_actors::ckpt::VersionFiles;
use freshet_actors::embedding::{ShardSnapshot, TableConfig};
use freshet_actors::envelope::{Envelope, TraceContext};
use freshet_actors::ids::{ShardId, TableName};

/// The largest frame payload in one packet. Ractor refuses an inbound network message over 16
/// MiB (`DEFAULT_MAX_INBOUND_FRAME_SIZE`) and wraps each cast in its own protobuf fields (the
/// target actor, the variant, the sender's name), so a packet stays at half the limit: a
/// larger message travels as several packets, reassembled on the far side.
pub const PACKET_CHUNK: usize = 8 << 20;

/// What a packet carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// A frame of a [`WireRequest`].
    Request,
    /// A frame of a [`WireAnswer`], to the request of the same id.
    Answer,
    /// A frame of a [`Heartbeat`](crate::membership::Heartbeat).
    Heartbeat,
    /// A kind this node does not know (a peer of another version): counted and refused.
    Unknown(String),
}

impl PacketKind {
    fn as_str(&self) -> &str {
        match self {
            Self::Request => "request",
            Self::Answer => "answer",
            Self::Heartbeat => "heartbeat",
            Self::Unknown(s) => s,
        }
    }

    fn parse(s: String) -> Self {
        match s.as_str() {
            "request" => Self::Request,
            "answer" => Self::Answer,
            "heartbeat" => Self::Heartbeat,
            _ => Self::Unknown(s),
        }
    }
}

/// One cast between two nodes' endpoints: one frame of Freshet's wire encoding, and the name
/// of the node that sent it (answers go back to that node's endpoint).
#[derive(Debug)]
pub struct Packet {
    pub from: String,
    pub kind: PacketKind,
    pub frame: Vec<u8>,
}

impl ractor::Message for Packet {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        Ok(SerializedMessage::Cast {
            variant: self.kind.as_str().to_owned(),
            args: self.frame,
            metadata: Some(self.from.into_bytes()),
        })
    }

    fn deserialize(bytes: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match bytes {
            SerializedMessage::Cast {
                variant,
                args,
                metadata,
            } => Ok(Self {
                from: String::from_utf8_lossy(&metadata.unwrap_or_default()).into_owned(),
                kind: PacketKind::parse(variant),
                frame: args,
            }),
            // Endpoints are only ever cast to; a call has no one to answer on Freshet's side.
            SerializedMessage::Call { .. } | SerializedMessage::CallReply(..) => {
                Err(BoxedDowncastErr)
            }
        }
    }
}

/// A request to a node.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireRequest {
    /// A message for one of the shard owners the node hosts.
    /// `epoch` is the placement the caller reached the owner through: an owner of another
    /// placement refuses it ([`WireAnswer::Fenced`]).
    Shard {
        shard: ShardId,
        epoch: u64,
        call: Envelope<ShardCall>,
    },
    /// A request to the node itself.
    Node(NodeCall),
}

/// What a node is asked to do itself.
#[derive(Debug, Serialize, Deserialize)]
pub enum NodeCall {
    /// Start (or start over) the owner of `shard` of `shard_count`, owning `tables`, from
    /// `restore` when given, for the placement of `epoch`: it answers only requests of that
    /// epoch.
    HostShard {
        shard: ShardId,
        shard_count: u32,
        epoch: u64,
        tables: Vec<(TableName, TableConfig)>,
        restore: Option<Box<ShardSnapshot>>,
    },
    /// Stop every owner this node hosts (the job that placed them finished).
    ReleaseShards,
    /// The sender stops: it is not waited for, nor counted down, nor dialled again.
    Leave,
    /// To a serving node: the trainer node published a version.
    Published(Published),
    /// To the trainer node: the last version it published, for a serving node that catches up.
    NewestPublished,
    /// To the trainer node: one version of its model store, manifest and files.
    FetchVersion { version: u64 },
}

/// A publication of the trainer node: what its own replicas were sent, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Increases with every publication of the node, and across its restarts (it starts from
    /// the clock in microseconds), so a serving node keeps the newest of notices that arrive
    /// out of order. A rollback is a publication too: the newest is not the highest version.
    pub seq: u64,
    pub version: u64,
    /// The version's life: the serving node's apply continues it.
    pub trace: TraceContext,
}

/// Every answer a node gives.
// Nearly every answer is the large variant (a shard's); boxing it would allocate for each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum WireAnswer {
    Shard(ShardAnswer),
    Node(NodeAnswer),
    /// The request could not be read or not be delivered; the reason says why.
    Fault(String),
    /// The owner the request was for is no longer this caller's: its placement was fenced
    /// (the placing node was lost, or this node stalled past its lease) or replaced by one of
    /// another epoch. The caller's placement is stale and must be made again.
    Fenced(String),
}

/// The answers to [`NodeCall`]s.
#[derive(Debug, Serialize, Deserialize)]
pub enum NodeAnswer {
    Hosted,
    Released {
        shards: u32,
    },
    Left,
    Refused(String),
    /// A notice of publication was taken.
    Noted,
    /// The last publication, if any yet.
    Newest(Option<Published>),
    /// One version, to be checked and written by [`ModelStore::import_version`](freshet_actors::ckpt::ModelStore::import_version).
    Version(Box<VersionFiles>),
}
