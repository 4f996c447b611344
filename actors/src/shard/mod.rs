//! The ShardOwner actor: owns one shard of every embedding table.
//!
//! - **Takes in:** batched lookups, training lookups, gradients, change queries, snapshot and
//!   restore requests, each for many keys of one table, each in an [`Envelope`].
//! - **Sends out:** only replies. It has no downstream actor.
//! - **Keeps:** the shard's [`EmbeddingShard`]. Owning the keys outright means no locks: one
//!   mailbox serialises every change to these rows.
//! - **Restart:** `pre_start` builds the state from [`ShardArgs`], restoring `args.restore` when
//!   given, so a supervisor restarts a shard at a checkpoint with the same code path as a start.
//!
//! Callers use [`ShardHandle`] (one shard) or [`ShardRouter`] (all shards, keys routed by
//! [`crate::shard_of`]); neither exposes messages or reply ports.

use std::path::PathBuf;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ckpt::{CkptError, ModelStore};
use crate::embedding::{
    ApplyReport, Changes, EmbeddingError, EmbeddingShard, ShardDelta, ShardSnapshot, TableConfig,
    TableStats, TrainCtx,
};
use crate::envelope::Envelope;
use crate::fault::Faults;
use crate::ids::{FeatureId, ShardId, TableName};
use crate::telemetry;

/// What a shard request can fail with.
#[derive(Debug, Error)]
pub enum ShardError {
    /// The shard refused the request; the same request would fail again.
    #[error("shard {shard}: {source}")]
    Embedding {
        shard: ShardId,
        #[source]
        source: EmbeddingError,
    },
    /// The shard did not answer: it is stopped, restarting or gone. Retry after recovery.
    #[error("shard {shard} unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
    /// Restoring from the model store failed (a missing or corrupt file, or rows that do not
    /// fit); the shard kept its state.
    #[error("shard {shard}: {source}")]
    Restore {
        shard: ShardId,
        #[source]
        source: CkptError,
    },
}

/// Construction inputs; a restart builds the state from these again.
#[derive(Debug, Clone)]
pub struct ShardArgs {
    pub shard: ShardId,
    pub shard_count: u32,
    pub tables: Vec<(TableName, TableConfig)>,
    /// This shard's own directory for the on-disk tier.
    pub spill_dir: Option<PathBuf>,
    /// State to start from (a checkpoint); `None` starts empty.
    pub restore: Option<ShardSnapshot>,
    /// Fault points for supervision tests: `shard.apply` (before gradients are applied).
    pub faults: Faults,
}

/// Counters: the actor's observable state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCounters {
    pub lookups: u64,
    pub training_lookups: u64,
    pub gradient_batches: u64,
    pub keys_looked_up: u64,
    pub gradients_applied: u64,
    pub errors: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    pub shard: ShardId,
    pub counters: ShardCounters,
    pub tables: Vec<(TableName, TableStats)>,
}

type Reply<T> = RpcReplyPort<Result<T, EmbeddingError>>;

/// The requests a ShardOwner serves. Built only by [`ShardHandle`].
#[derive(Debug)]
pub enum ShardRequest {
    Lookup {
        table: TableName,
        keys: Vec<FeatureId>,
        reply: Reply<Vec<f32>>,
    },
    LookupForTraining {
        table: TableName,
        keys: Vec<FeatureId>,
        ctx: TrainCtx,
        reply: Reply<Vec<f32>>,
    },
    ApplyGradients {
        table: TableName,
        keys: Vec<FeatureId>,
        grads: Vec<f32>,
        ctx: TrainCtx,
        reply: Reply<ApplyReport>,
    },
    ChangesSince {
        table: TableName,
        since: u64,
        reply: Reply<Changes>,
    },
    Snapshot {
        reply: Reply<ShardSnapshot>,
    },
    /// Every table's checkpoint delta after the given table versions.
    DeltaSince {
        since: Vec<(TableName, u64)>,
        reply: Reply<ShardDelta>,
    },
    /// A checkpoint holds everything up to these table versions: drop their change history.
    ForgetChanges {
        through: Vec<(TableName, u64)>,
        reply: Reply<()>,
    },
    Restore {
        snapshot: Box<ShardSnapshot>,
        reply: Reply<()>,
    },
    /// Restore a version from the model store, the owner reading its own files: a full
    /// version streams from disk straight into the tables. Local-only: the store is this
    /// node's.
    RestoreFrom {
        store: ModelStore,
        version: u64,
        reply: RpcReplyPort<Result<u64, CkptError>>,
    },
    /// Drop every row: back to the state of a fresh start from the same args.
    Reset {
        reply: Reply<()>,
    },
    Stats {
        reply: RpcReplyPort<ShardStats>,
    },
}

pub type ShardMsg = Envelope<ShardRequest>;

/// The actor. Stateless itself; everything lives in [`ShardState`].
#[derive(Debug, Default)]
pub struct ShardOwner;

#[derive(Debug)]
pub struct ShardState {
    shard: EmbeddingShard,
    counters: ShardCounters,
    args: ShardArgs,
}

impl Actor for ShardOwner {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        let dir = args.spill_dir.as_deref();
        let mut shard = EmbeddingShard::new(args.shard, args.shard_count, &args.tables, dir)?;
        let mut args = args;
        if let Some(snap) = args.restore.take() {
            shard.restore(snap)?;
        }
        tracing::debug!(
            shard = args.shard,
            tables = args.tables.len(),
            "shard owner started"
        );
        Ok(ShardState {
            shard,
            counters: ShardCounters::default(),
            args,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: ShardMsg,
        st: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        // A reply that cannot be delivered means the caller gave up (timeout or drop); there
        // is no one left to tell, so the send result is deliberately ignored.
        let c = &mut st.counters;
        let trace = msg.trace;
        match msg.body {
            ShardRequest::Lookup { table, keys, reply } => {
                c.lookups += 1;
                c.keys_looked_up += keys.len() as u64;
                let r = st.shard.table_mut(&table).and_then(|t| {
                    let mut out = Vec::with_capacity(keys.len() * t.dim());
                    t.lookup(&keys, &mut out).map(|()| out)
                });
                c.errors += u64::from(r.is_err());
                let _ = reply.send(r);
            }
            ShardRequest::LookupForTraining {
                table,
                keys,
                ctx,
                reply,
            } => {
                c.training_lookups += 1;
                c.keys_looked_up += keys.len() as u64;
                let span = telemetry::received(&trace, || {
                    tracing::info_span!(target: telemetry::TARGET, "shard.lookup.serve",
                        otel.kind = "server", freshet.shard = i64::from(st.args.shard),
                        freshet.table = %table, freshet.keys = keys.len() as i64)
                });
                let _entered = span.enter();
                let r = st.shard.table_mut(&table).and_then(|t| {
                    let mut out = Vec::with_capacity(keys.len() * t.dim());
                    t.lookup_for_training(&keys, &ctx, &mut out).map(|()| out)
                });
                c.errors += u64::from(r.is_err());
                let _ = reply.send(r);
            }
            ShardRequest::ApplyGradients {
                table,
                keys,
                grads,
                ctx,
                reply,
            } => {
                let span = telemetry::received(&trace, || {
                    tracing::info_span!(target: telemetry::TARGET, "shard.push.apply",
                        otel.kind = "server", freshet.shard = i64::from(st.args.shard),
                        freshet.table = %table, freshet.keys = keys.len() as i64)
                });
                let _entered = span.enter();
                st.args.faults.check("shard.apply");
                c.gradient_batches += 1;
                let r = st
                    .shard
                    .table_mut(&table)
                    .and_then(|t| t.apply_gradients(&keys, &grads, &ctx));
                match &r {
                    Ok(rep) => c.gradients_applied += rep.applied,
                    Err(_) => c.errors += 1,
                }
                let _ = reply.send(r);
            }
            ShardRequest::ChangesSince {
                table,
                since,
                reply,
            } => {
                let r = st
                    .shard
                    .table_mut(&table)
                    .and_then(|t| t.changes_since(since));
                let _ = reply.send(r);
            }
            ShardRequest::Snapshot { reply } => {
                let _ = reply.send(st.shard.snapshot());
            }
            ShardRequest::DeltaSince { since, reply } => {
                let _ = reply.send(st.shard.delta_since(&since));
            }
            ShardRequest::ForgetChanges { through, reply } => {
                st.shard.forget_changes_through(&through);
                let _ = reply.send(Ok(()));
            }
            ShardRequest::Restore { snapshot, reply } => {
                let _ = reply.send(st.shard.restore(*snapshot));
            }
            ShardRequest::RestoreFrom {
                store,
                version,
                reply,
            } => {
                // Seconds of disk and memory work, so off the async workers: into a shard
                // built from the args, as a restart would build it, swapped in on success.
                // The owner answers nothing else meanwhile; it has nothing to serve until
                // restored.
                let a = &st.args;
                let (id, count) = (a.shard, a.shard_count);
                let (tables, spill) = (a.tables.clone(), a.spill_dir.clone());
                let r = tokio::task::spawn_blocking(move || {
                    let mut fresh = EmbeddingShard::new(id, count, &tables, spill.as_deref())
                        .map_err(|e| CkptError::Invalid(format!("shard {id}: {e}")))?;
                    let bytes = store.restore_shard_into(version, &mut fresh)?;
                    Ok((fresh, bytes))
                })
                .await
                .unwrap_or_else(|e| Err(CkptError::Invalid(format!("restore task: {e}"))));
                let _ = reply.send(r.map(|(fresh, bytes)| {
                    st.shard = fresh;
                    bytes
                }));
            }
            ShardRequest::Reset { reply } => {
                let a = &st.args;
                let fresh =
                    EmbeddingShard::new(a.shard, a.shard_count, &a.tables, a.spill_dir.as_deref());
                let _ = reply.send(fresh.map(|f| st.shard = f));
            }
            ShardRequest::Stats { reply } => {
                let _ = reply.send(ShardStats {
                    shard: st.shard.id(),
                    counters: st.counters.clone(),
                    tables: st.shard.stats(),
                });
            }
        }
        Ok(())
    }
}

mod handle;
mod router;

pub use handle::{Pending, ShardHandle};
pub use router::{PendingGradients, PendingRows, ShardPlacer, ShardPlan, ShardRouter};

#[cfg(test)]
mod tests;
