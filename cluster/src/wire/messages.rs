//! Every message that may cross nodes, with its wire form: one `Call` enum (the message
//! without reply ports) and one `Answer` enum per actor.
//!
//! What stays local, and why:
//! - self-messages that drive an actor's own loop (`Poll`, `Pull`, `Woken`, the supervisor's
//!   `Restart`): they are sent by the actor to itself;
//! - `WriterRequest::Subscribe`: it carries an in-process channel; a remote subscriber reads
//!   the model store instead.

use serde::{Deserialize, Serialize};

use super::{remote_port, responder, Pending, Remote, Split, WireError};
use freshet_actors::ckpt::writer::{CaptureError, StepBoundary, WriterRequest, WriterStats};
use freshet_actors::ckpt::Manifest;
use freshet_actors::embedding::snapshot::f32_bytes;
use freshet_actors::embedding::{
    ApplyReport, Changes, EmbeddingError, ShardDelta, ShardSnapshot, TrainCtx,
};
use freshet_actors::ids::{FeatureId, ShardId, TableName};
use freshet_actors::joiner::{CheckpointFailed, JoinerMsg, JoinerStats};
use freshet_actors::online::validator::{ValidatorRequest, ValidatorStatus};
use freshet_actors::serving::replica::{ReplicaRequest, ReplicaStatus};
use freshet_actors::shard::{ShardRequest, ShardStats};
use freshet_actors::supervisor::{ChildStatus, RestartError, SupervisorMsg};
use freshet_actors::training::{FinishError, TrainerRequest, TrainerStatus};

// ---------------------------------------------------------------------------------------------
// ShardOwner

/// A [`ShardRequest`] on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ShardCall {
    Lookup {
        table: TableName,
        #[serde(with = "super::u64_bytes")]
        keys: Vec<FeatureId>,
    },
    LookupForTraining {
        table: TableName,
        #[serde(with = "super::u64_bytes")]
        keys: Vec<FeatureId>,
        ctx: TrainCtx,
    },
    ApplyGradients {
        table: TableName,
        #[serde(with = "super::u64_bytes")]
        keys: Vec<FeatureId>,
        #[serde(with = "f32_bytes")]
        grads: Vec<f32>,
        ctx: TrainCtx,
    },
    ChangesSince {
        table: TableName,
        since: u64,
    },
    Snapshot,
    DeltaSince {
        since: Vec<(TableName, u64)>,
    },
    ForgetChanges {
        through: Vec<(TableName, u64)>,
    },
    Restore {
        snapshot: Box<ShardSnapshot>,
    },
    Reset,
    Stats,
}

/// Every answer a ShardOwner gives, on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ShardAnswer {
    Rows(#[serde(with = "f32_bytes")] Vec<f32>),
    Applied(ApplyReport),
    Changes(Changes),
    Snapshot(Box<ShardSnapshot>),
    Delta(ShardDelta),
    Done,
    Stats(ShardStats),
    Refused(RemoteEmbeddingError),
}

/// An [`EmbeddingError`] on the wire. The cases a caller acts on keep their fields; the rest
/// (configuration and disk errors of the remote node) travel as their message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RemoteEmbeddingError {
    UnknownTable(TableName),
    GradientShape {
        table: TableName,
        keys: u64,
        dim: u64,
        got: u64,
    },
    ChangesCompacted {
        table: TableName,
        since: u64,
        floor: u64,
    },
    SnapshotMismatch {
        table: TableName,
        reason: String,
    },
    WrongShard {
        got: ShardId,
        got_count: u32,
        want: ShardId,
        want_count: u32,
    },
    /// The owner's node could not be reached; the handle reports the shard unavailable.
    Unreachable(String),
    Other(String),
}

impl From<EmbeddingError> for RemoteEmbeddingError {
    fn from(e: EmbeddingError) -> Self {
        match e {
            EmbeddingError::UnknownTable(t) => Self::UnknownTable(t),
            EmbeddingError::GradientShape {
                table,
                keys,
                dim,
                got,
            } => Self::GradientShape {
                table,
                keys: keys as u64,
                dim: dim as u64,
                got: got as u64,
            },
            EmbeddingError::ChangesCompacted {
                table,
                since,
                floor,
            } => Self::ChangesCompacted {
                table,
                since,
                floor,
            },
            EmbeddingError::SnapshotMismatch { table, reason } => {
                Self::SnapshotMismatch { table, reason }
            }
            EmbeddingError::WrongShard {
                got,
                got_count,
                want,
                want_count,
            } => Self::WrongShard {
                got,
                got_count,
                want,
                want_count,
            },
            EmbeddingError::Unreachable(reason) => Self::Unreachable(reason),
            other @ (EmbeddingError::Config(_)
            | EmbeddingError::Tier { .. }
            | EmbeddingError::Restore { .. }
            | EmbeddingError::Remote(_)) => Self::Other(other.to_string()),
        }
    }
}

impl From<RemoteEmbeddingError> for EmbeddingError {
    fn from(e: RemoteEmbeddingError) -> Self {
        match e {
            RemoteEmbeddingError::UnknownTable(t) => Self::UnknownTable(t),
            RemoteEmbeddingError::GradientShape {
                table,
                keys,
                dim,
                got,
            } => Self::GradientShape {
                table,
                keys: keys as usize,
                dim: dim as usize,
                got: got as usize,
            },
            RemoteEmbeddingError::ChangesCompacted {
                table,
                since,
                floor,
            } => Self::ChangesCompacted {
                table,
                since,
                floor,
            },
            RemoteEmbeddingError::SnapshotMismatch { table, reason } => {
                Self::SnapshotMismatch { table, reason }
            }
            RemoteEmbeddingError::WrongShard {
                got,
                got_count,
                want,
                want_count,
            } => Self::WrongShard {
                got,
                got_count,
                want,
                want_count,
            },
            RemoteEmbeddingError::Unreachable(reason) => Self::Unreachable(reason),
            RemoteEmbeddingError::Other(message) => Self::Remote(message),
        }
    }
}

impl Remote for ShardRequest {
    type Call = ShardCall;
    type Answer = ShardAnswer;

    fn into_call(self) -> Result<Split<ShardCall, ShardAnswer>, WireError> {
        use ShardAnswer as A;
        // Each typed reply is `Result<T, EmbeddingError>`; a refusal fits every call.
        macro_rules! reply {
            ($port:expr, $name:literal, $pat:pat => $v:expr) => {
                Some(responder($port, $name, |a| match a {
                    $pat => Some(Ok($v)),
                    A::Refused(e) => Some(Err(e.into())),
                    _ => None,
                }))
            };
        }
        Ok(match self {
            ShardRequest::Lookup { table, keys, reply } => (
                ShardCall::Lookup { table, keys },
                reply!(reply, "lookup", A::Rows(v) => v),
            ),
            ShardRequest::LookupForTraining {
                table,
                keys,
                ctx,
                reply,
            } => (
                ShardCall::LookupForTraining { table, keys, ctx },
                reply!(reply, "lookup_for_training", A::Rows(v) => v),
            ),
            ShardRequest::ApplyGradients {
                table,
                keys,
                grads,
                ctx,
                reply,
            } => (
                ShardCall::ApplyGradients {
                    table,
                    keys,
                    grads,
                    ctx,
                },
                reply!(reply, "apply_gradients", A::Applied(r) => r),
            ),
            ShardRequest::ChangesSince {
                table,
                since,
                reply,
            } => (
                ShardCall::ChangesSince { table, since },
                reply!(reply, "changes_since", A::Changes(c) => c),
            ),
            ShardRequest::Snapshot { reply } => (
                ShardCall::Snapshot,
                reply!(reply, "snapshot", A::Snapshot(s) => *s),
            ),
            ShardRequest::DeltaSince { since, reply } => (
                ShardCall::DeltaSince { since },
                reply!(reply, "delta_since", A::Delta(d) => d),
            ),
            ShardRequest::ForgetChanges { through, reply } => (
                ShardCall::ForgetChanges { through },
                reply!(reply, "forget_changes", A::Done => ()),
            ),
            ShardRequest::Restore { snapshot, reply } => (
                ShardCall::Restore { snapshot },
                reply!(reply, "restore", A::Done => ()),
            ),
            ShardRequest::Reset { reply } => {
                (ShardCall::Reset, reply!(reply, "reset", A::Done => ()))
            }
            // The store is the caller's node's; a remote owner is sent a snapshot instead.
            ShardRequest::RestoreFrom { .. } => {
                return Err(WireError::LocalOnly("ShardRequest::RestoreFrom"))
            }
            ShardRequest::Stats { reply } => (
                ShardCall::Stats,
                Some(responder(reply, "stats", |a| match a {
                    A::Stats(s) => Some(s),
                    _ => None,
                })),
            ),
        })
    }

    fn from_call(call: ShardCall) -> (Self, Option<Pending<ShardAnswer>>) {
        use ShardAnswer as A;
        // A reply port for `Result<T, EmbeddingError>`: a value becomes `$ok`, an error a
        // refusal.
        macro_rules! port {
            ($ok:expr) => {
                remote_port(|r: Result<_, EmbeddingError>| match r {
                    Ok(v) => ($ok)(v),
                    Err(e) => A::Refused(e.into()),
                })
            };
        }
        let (msg, pending) = match call {
            ShardCall::Lookup { table, keys } => {
                let (reply, p) = port!(A::Rows);
                (ShardRequest::Lookup { table, keys, reply }, p)
            }
            ShardCall::LookupForTraining { table, keys, ctx } => {
                let (reply, p) = port!(A::Rows);
                let msg = ShardRequest::LookupForTraining {
                    table,
                    keys,
                    ctx,
                    reply,
                };
                (msg, p)
            }
            ShardCall::ApplyGradients {
                table,
                keys,
                grads,
                ctx,
            } => {
                let (reply, p) = port!(A::Applied);
                let msg = ShardRequest::ApplyGradients {
                    table,
                    keys,
                    grads,
                    ctx,
                    reply,
                };
                (msg, p)
            }
            ShardCall::ChangesSince { table, since } => {
                let (reply, p) = port!(A::Changes);
                let msg = ShardRequest::ChangesSince {
                    table,
                    since,
                    reply,
                };
                (msg, p)
            }
            ShardCall::Snapshot => {
                let (reply, p) = port!(|s| A::Snapshot(Box::new(s)));
                (ShardRequest::Snapshot { reply }, p)
            }
            ShardCall::DeltaSince { since } => {
                let (reply, p) = port!(A::Delta);
                (ShardRequest::DeltaSince { since, reply }, p)
            }
            ShardCall::ForgetChanges { through } => {
                let (reply, p) = port!(|()| A::Done);
                (ShardRequest::ForgetChanges { through, reply }, p)
            }
            ShardCall::Restore { snapshot } => {
                let (reply, p) = port!(|()| A::Done);
                (ShardRequest::Restore { snapshot, reply }, p)
            }
            ShardCall::Reset => {
                let (reply, p) = port!(|()| A::Done);
                (ShardRequest::Reset { reply }, p)
            }
            ShardCall::Stats => {
                let (reply, p) = remote_port(A::Stats);
                (ShardRequest::Stats { reply }, p)
            }
        };
        (msg, Some(pending))
    }
}

// ---------------------------------------------------------------------------------------------
// CheckpointWriter

#[derive(Debug, Serialize, Deserialize)]
pub enum WriterCall {
    Capture { at: Box<StepBoundary> },
    Flush,
    Reset,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WriterAnswer {
    Captured(Result<(), CaptureError>),
    Flushed(WriterStats),
    Done,
}

impl Remote for WriterRequest {
    type Call = WriterCall;
    type Answer = WriterAnswer;

    fn into_call(self) -> Result<Split<WriterCall, WriterAnswer>, WireError> {
        use WriterAnswer as A;
        Ok(match self {
            WriterRequest::Capture { at, reply } => (
                WriterCall::Capture { at },
                Some(responder(reply, "capture", |a| match a {
                    A::Captured(r) => Some(r),
                    _ => None,
                })),
            ),
            WriterRequest::Flush { reply } => (
                WriterCall::Flush,
                Some(responder(reply, "flush", |a| match a {
                    A::Flushed(s) => Some(s),
                    _ => None,
                })),
            ),
            WriterRequest::Reset { reply } => (
                WriterCall::Reset,
                Some(responder(reply, "reset", |a| match a {
                    A::Done => Some(()),
                    _ => None,
                })),
            ),
            WriterRequest::Subscribe { .. } => {
                return Err(WireError::LocalOnly("WriterRequest::Subscribe"))
            }
        })
    }

    fn from_call(call: WriterCall) -> (Self, Option<Pending<WriterAnswer>>) {
        use WriterAnswer as A;
        match call {
            WriterCall::Capture { at } => {
                let (reply, p) = remote_port(A::Captured);
                (WriterRequest::Capture { at, reply }, Some(p))
            }
            WriterCall::Flush => {
                let (reply, p) = remote_port(A::Flushed);
                (WriterRequest::Flush { reply }, Some(p))
            }
            WriterCall::Reset => {
                let (reply, p) = remote_port(|()| A::Done);
                (WriterRequest::Reset { reply }, Some(p))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ServingReplica

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReplicaCall {
    Publish(u64),
    Status,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReplicaAnswer {
    Status(ReplicaStatus),
}

impl Remote for ReplicaRequest {
    type Call = ReplicaCall;
    type Answer = ReplicaAnswer;

    fn into_call(self) -> Result<Split<ReplicaCall, ReplicaAnswer>, WireError> {
        Ok(match self {
            ReplicaRequest::Publish(v) => (ReplicaCall::Publish(v), None),
            ReplicaRequest::Status(reply) => (
                ReplicaCall::Status,
                Some(responder(reply, "status", |ReplicaAnswer::Status(s)| {
                    Some(s)
                })),
            ),
        })
    }

    fn from_call(call: ReplicaCall) -> (Self, Option<Pending<ReplicaAnswer>>) {
        match call {
            ReplicaCall::Publish(v) => (ReplicaRequest::Publish(v), None),
            ReplicaCall::Status => {
                let (reply, p) = remote_port(ReplicaAnswer::Status);
                (ReplicaRequest::Status(reply), Some(p))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validator

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ValidatorCall {
    Candidate(Box<Manifest>),
    Status,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ValidatorAnswer {
    Status(ValidatorStatus),
}

impl Remote for ValidatorRequest {
    type Call = ValidatorCall;
    type Answer = ValidatorAnswer;

    fn into_call(self) -> Result<Split<ValidatorCall, ValidatorAnswer>, WireError> {
        Ok(match self {
            ValidatorRequest::Candidate(m) => (ValidatorCall::Candidate(m), None),
            ValidatorRequest::Status(reply) => (
                ValidatorCall::Status,
                Some(responder(reply, "status", |ValidatorAnswer::Status(s)| {
                    Some(s)
                })),
            ),
            ValidatorRequest::Poll => return Err(WireError::LocalOnly("ValidatorRequest::Poll")),
        })
    }

    fn from_call(call: ValidatorCall) -> (Self, Option<Pending<ValidatorAnswer>>) {
        match call {
            ValidatorCall::Candidate(m) => (ValidatorRequest::Candidate(m), None),
            ValidatorCall::Status => {
                let (reply, p) = remote_port(ValidatorAnswer::Status);
                (ValidatorRequest::Status(reply), Some(p))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trainer

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TrainerCall {
    Status,
    Finish,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TrainerAnswer {
    Status(TrainerStatus),
    Finished(Result<Option<u64>, FinishError>),
}

impl Remote for TrainerRequest {
    type Call = TrainerCall;
    type Answer = TrainerAnswer;

    fn into_call(self) -> Result<Split<TrainerCall, TrainerAnswer>, WireError> {
        use TrainerAnswer as A;
        Ok(match self {
            TrainerRequest::Status(reply) => (
                TrainerCall::Status,
                Some(responder(reply, "status", |a| match a {
                    A::Status(s) => Some(s),
                    _ => None,
                })),
            ),
            TrainerRequest::Finish(reply) => (
                TrainerCall::Finish,
                Some(responder(reply, "finish", |a| match a {
                    A::Finished(r) => Some(r),
                    _ => None,
                })),
            ),
            TrainerRequest::Pull => return Err(WireError::LocalOnly("TrainerRequest::Pull")),
        })
    }

    fn from_call(call: TrainerCall) -> (Self, Option<Pending<TrainerAnswer>>) {
        match call {
            TrainerCall::Status => {
                let (reply, p) = remote_port(TrainerAnswer::Status);
                (TrainerRequest::Status(reply), Some(p))
            }
            TrainerCall::Finish => {
                let (reply, p) = remote_port(TrainerAnswer::Finished);
                (TrainerRequest::Finish(reply), Some(p))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SampleJoiner

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JoinerCall {
    Stats,
    Checkpoint,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JoinerAnswer {
    Stats(JoinerStats),
    Checkpointed(Result<(), CheckpointFailed>),
}

impl Remote for JoinerMsg {
    type Call = JoinerCall;
    type Answer = JoinerAnswer;

    fn into_call(self) -> Result<Split<JoinerCall, JoinerAnswer>, WireError> {
        use JoinerAnswer as A;
        Ok(match self {
            JoinerMsg::Stats(reply) => (
                JoinerCall::Stats,
                Some(responder(reply, "stats", |a| match a {
                    A::Stats(s) => Some(s),
                    _ => None,
                })),
            ),
            JoinerMsg::Checkpoint(reply) => (
                JoinerCall::Checkpoint,
                Some(responder(reply, "checkpoint", |a| match a {
                    A::Checkpointed(r) => Some(r),
                    _ => None,
                })),
            ),
            JoinerMsg::Poll => return Err(WireError::LocalOnly("JoinerMsg::Poll")),
            JoinerMsg::Woken => return Err(WireError::LocalOnly("JoinerMsg::Woken")),
        })
    }

    fn from_call(call: JoinerCall) -> (Self, Option<Pending<JoinerAnswer>>) {
        match call {
            JoinerCall::Stats => {
                let (reply, p) = remote_port(JoinerAnswer::Stats);
                (JoinerMsg::Stats(reply), Some(p))
            }
            JoinerCall::Checkpoint => {
                let (reply, p) = remote_port(JoinerAnswer::Checkpointed);
                (JoinerMsg::Checkpoint(reply), Some(p))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Supervisor

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SupervisorCall {
    RestartFrom { name: String },
    Status,
    Shutdown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SupervisorAnswer {
    Restarted(Result<(), RestartError>),
    Status(Vec<ChildStatus>),
    Done,
}

impl Remote for SupervisorMsg {
    type Call = SupervisorCall;
    type Answer = SupervisorAnswer;

    fn into_call(self) -> Result<Split<SupervisorCall, SupervisorAnswer>, WireError> {
        use SupervisorAnswer as A;
        Ok(match self {
            SupervisorMsg::RestartFrom { name, reply } => (
                SupervisorCall::RestartFrom { name },
                Some(responder(reply, "restart_from", |a| match a {
                    A::Restarted(r) => Some(r),
                    _ => None,
                })),
            ),
            SupervisorMsg::Status(reply) => (
                SupervisorCall::Status,
                Some(responder(reply, "status", |a| match a {
                    A::Status(s) => Some(s),
                    _ => None,
                })),
            ),
            SupervisorMsg::Shutdown(reply) => (
                SupervisorCall::Shutdown,
                Some(responder(reply, "shutdown", |a| match a {
                    A::Done => Some(()),
                    _ => None,
                })),
            ),
            SupervisorMsg::Restart => return Err(WireError::LocalOnly("SupervisorMsg::Restart")),
        })
    }

    fn from_call(call: SupervisorCall) -> (Self, Option<Pending<SupervisorAnswer>>) {
        use SupervisorAnswer as A;
        match call {
            SupervisorCall::RestartFrom { name } => {
                let (reply, p) = remote_port(A::Restarted);
                (SupervisorMsg::RestartFrom { name, reply }, Some(p))
            }
            SupervisorCall::Status => {
                let (reply, p) = remote_port(A::Status);
                (SupervisorMsg::Status(reply), Some(p))
            }
            SupervisorCall::Shutdown => {
                let (reply, p) = remote_port(|()| A::Done);
                (SupervisorMsg::Shutdown(reply), Some(p))
            }
        }
    }
}
