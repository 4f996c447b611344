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
//! [`shard_of`]); neither exposes messages or reply ports.

use std::path::PathBuf;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ckpt::{CkptError, ModelStore};
use crate::embedding::{
    ApplyReport, Changes, EmbeddingError, EmbeddingShard, ShardDelta, ShardSnapshot, TableConfig,
    TableStats, TrainCtx,
};
use crate::envelope::{Envelope, TraceContext};
use crate::fault::Faults;
use crate::ids::{FeatureId, ShardId, TableName};
use crate::routing::shard_of;

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

/// A typed handle to one ShardOwner.
#[derive(Debug, Clone)]
pub struct ShardHandle {
    shard: ShardId,
    actor: ActorRef<ShardMsg>,
    /// Whether the owner runs in this process (spawned here), so that it can read this
    /// node's model store itself.
    local: bool,
}

impl ShardHandle {
    /// Spawns a ShardOwner and returns its handle and join handle.
    pub async fn spawn(
        args: ShardArgs,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        let shard = args.shard;
        let (actor, join) = Self::start(args, None).await?;
        let local = true;
        Ok((
            Self {
                shard,
                actor,
                local,
            },
            join,
        ))
    }

    /// Spawns a ShardOwner linked to a supervisor.
    pub async fn spawn_linked(
        args: ShardArgs,
        supervisor: ractor::ActorCell,
    ) -> Result<Self, ractor::SpawnErr> {
        let shard = args.shard;
        let (actor, _join) = Self::start(args, Some(supervisor)).await?;
        let local = true;
        Ok(Self {
            shard,
            actor,
            local,
        })
    }

    /// Starts an owner on a thread of its own (`shard-N`, a current-thread runtime) rather
    /// than as a task of the caller's runtime. Why: a training step sends every owner its
    /// part of a batch at once, from a thread that then waits, and the multi-threaded
    /// runtime, its workers parked since the last step, ran the parts one after another on
    /// one worker (4 × 250 µs of work took 1.13 ms on 2 workers, 0.64-0.84 ms on owner
    /// threads: `examples/owner_wake.rs`, docs/performance.md). A thread per owner is woken
    /// by the message itself, so owners work side by side on whatever cores are free, and an
    /// owner's blocking work (an on-disk tier read, a restore) stalls no one else's tasks.
    /// The returned join handle, a task of the caller's runtime, ends when the owner has
    /// stopped.
    async fn start(
        args: ShardArgs,
        supervisor: Option<ractor::ActorCell>,
    ) -> Result<(ActorRef<ShardMsg>, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        let shard = args.shard;
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let startup = |e: std::io::Error| ractor::SpawnErr::StartupFailed(Box::new(e));
        std::thread::Builder::new()
            .name(format!("shard-{shard}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(startup(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let spawned = match supervisor {
                        Some(sup) => Actor::spawn_linked(None, ShardOwner, args, sup).await,
                        None => Actor::spawn(None, ShardOwner, args).await,
                    };
                    match spawned {
                        Ok((actor, join)) => {
                            let _ = started_tx.send(Ok(actor));
                            let _ = join.await;
                            let _ = done_tx.send(());
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(startup)?;
        let actor = started_rx.await.map_err(|_| {
            startup(std::io::Error::other(format!(
                "the thread of shard {shard} ended before its owner started"
            )))
        })??;
        let join = tokio::spawn(async move {
            let _ = done_rx.await;
        });
        Ok((actor, join))
    }

    /// A handle to an owner this process did not spawn: one on another node, behind a wire
    /// hop.
    pub fn new(shard: ShardId, actor: ActorRef<ShardMsg>) -> Self {
        let local = false;
        Self {
            shard,
            actor,
            local,
        }
    }

    /// Whether the owner runs in this process and can read this node's model store.
    pub fn is_local(&self) -> bool {
        self.local
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn actor(&self) -> &ActorRef<ShardMsg> {
        &self.actor
    }

    async fn ask<T: Send + 'static>(
        &self,
        trace: TraceContext,
        make: impl FnOnce(Reply<T>) -> ShardRequest,
    ) -> Result<T, ShardError> {
        self.send(trace, make)?.wait().await
    }

    /// One request and its answer: the owner's refusal `E` becomes `refused(E)`, no answer
    /// at all becomes `Unavailable`.
    async fn call<T: Send + 'static, E: Send + 'static>(
        &self,
        trace: TraceContext,
        make: impl FnOnce(RpcReplyPort<Result<T, E>>) -> ShardRequest,
        refused: impl FnOnce(E) -> ShardError,
    ) -> Result<T, ShardError> {
        let unavailable = |reason: String| ShardError::Unavailable {
            shard: self.shard,
            reason,
        };
        match self
            .actor
            .call(|reply| Envelope::with_trace(trace, make(reply)), None)
            .await
        {
            Ok(CallResult::Success(Ok(v))) => Ok(v),
            Ok(CallResult::Success(Err(e))) => Err(refused(e)),
            Ok(CallResult::Timeout) => Err(unavailable("timed out".into())),
            Ok(CallResult::SenderError) => Err(unavailable("stopped before replying".into())),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    pub async fn lookup(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
    ) -> Result<Vec<f32>, ShardError> {
        self.send_lookup(table, keys)?.wait().await
    }

    pub async fn lookup_for_training(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
        ctx: TrainCtx,
    ) -> Result<Vec<f32>, ShardError> {
        self.send_lookup_for_training(table, keys, ctx)?
            .wait()
            .await
    }

    /// [`ShardHandle::lookup`], sent now and answered later: requests sent to this owner after
    /// it returns are handled after it.
    pub fn send_lookup(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
    ) -> Result<Pending<Vec<f32>>, ShardError> {
        let table = table.clone();
        self.send(TraceContext::none(), |reply| ShardRequest::Lookup {
            table,
            keys,
            reply,
        })
    }

    /// [`ShardHandle::lookup_for_training`], sent now and answered later.
    pub fn send_lookup_for_training(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
        ctx: TrainCtx,
    ) -> Result<Pending<Vec<f32>>, ShardError> {
        let table = table.clone();
        self.send(TraceContext::none(), |reply| {
            ShardRequest::LookupForTraining {
                table,
                keys,
                ctx,
                reply,
            }
        })
    }

    /// Puts a request in the owner's mailbox now and returns its answer to await later.
    ///
    /// The mailbox is first in, first out, so whatever anyone sends this owner after `send`
    /// returns is handled after this request, whether or not its answer has been awaited. The
    /// router relies on it twice: a batch's requests to all shards leave the caller before it
    /// waits for any, with no task spawned per shard, and a step's gradients need not be
    /// awaited before the next step's lookup.
    fn send<T>(
        &self,
        trace: TraceContext,
        make: impl FnOnce(Reply<T>) -> ShardRequest,
    ) -> Result<Pending<T>, ShardError> {
        let (tx, rx) = ractor::concurrency::oneshot();
        self.actor
            .send_message(Envelope::with_trace(trace, make(tx.into())))
            .map_err(|e| ShardError::Unavailable {
                shard: self.shard,
                reason: e.to_string(),
            })?;
        Ok(Pending {
            shard: self.shard,
            reply: rx,
        })
    }

    pub async fn apply_gradients(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
        grads: Vec<f32>,
        ctx: TrainCtx,
    ) -> Result<ApplyReport, ShardError> {
        self.send_gradients(table, keys, grads, ctx)?.wait().await
    }

    /// The gradients, sent now and answered later: every request sent to this owner after
    /// this returns sees them applied.
    pub fn send_gradients(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
        grads: Vec<f32>,
        ctx: TrainCtx,
    ) -> Result<Pending<ApplyReport>, ShardError> {
        let table = table.clone();
        self.send(TraceContext::none(), |reply| ShardRequest::ApplyGradients {
            table,
            keys,
            grads,
            ctx,
            reply,
        })
    }

    pub async fn changes_since(
        &self,
        table: &TableName,
        since: u64,
    ) -> Result<Changes, ShardError> {
        let table = table.clone();
        self.ask(TraceContext::none(), |reply| ShardRequest::ChangesSince {
            table,
            since,
            reply,
        })
        .await
    }

    pub async fn snapshot(&self) -> Result<ShardSnapshot, ShardError> {
        self.ask(TraceContext::none(), |reply| ShardRequest::Snapshot {
            reply,
        })
        .await
    }

    pub async fn delta_since(
        &self,
        since: Vec<(TableName, u64)>,
    ) -> Result<ShardDelta, ShardError> {
        self.ask(TraceContext::none(), |reply| ShardRequest::DeltaSince {
            since,
            reply,
        })
        .await
    }

    pub async fn forget_changes_through(
        &self,
        through: Vec<(TableName, u64)>,
    ) -> Result<(), ShardError> {
        self.ask(TraceContext::none(), |reply| ShardRequest::ForgetChanges {
            through,
            reply,
        })
        .await
    }

    /// Drops every row (a trainer starting a model from scratch).
    pub async fn reset(&self) -> Result<(), ShardError> {
        self.ask(TraceContext::none(), |reply| ShardRequest::Reset { reply })
            .await
    }

    pub async fn restore(&self, snapshot: ShardSnapshot) -> Result<(), ShardError> {
        self.ask(TraceContext::none(), |reply| ShardRequest::Restore {
            snapshot: Box::new(snapshot),
            reply,
        })
        .await
    }

    /// Restores version `v` of `store` with the owner reading its own files (see
    /// [`ModelStore::restore_shard_into`]); returns the bytes read. Only for a local owner
    /// ([`ShardHandle::is_local`]); one on another node gets a snapshot through
    /// [`ShardHandle::restore`].
    pub async fn restore_from(&self, store: &ModelStore, v: u64) -> Result<u64, ShardError> {
        let (store, shard) = (store.clone(), self.shard);
        let make = |reply| ShardRequest::RestoreFrom {
            store,
            version: v,
            reply,
        };
        self.call(TraceContext::none(), make, |source| ShardError::Restore {
            shard,
            source,
        })
        .await
    }

    pub async fn stats(&self) -> Result<ShardStats, ShardError> {
        match self
            .actor
            .call(|reply| Envelope::new(ShardRequest::Stats { reply }), None)
            .await
        {
            Ok(CallResult::Success(s)) => Ok(s),
            Ok(_) => Err(ShardError::Unavailable {
                shard: self.shard,
                reason: "stopped before replying".into(),
            }),
            Err(e) => Err(ShardError::Unavailable {
                shard: self.shard,
                reason: e.to_string(),
            }),
        }
    }
}

/// The answer to a request already in a shard owner's mailbox ([`ShardHandle::send_lookup`],
/// [`ShardHandle::send_gradients`] and the like).
#[derive(Debug)]
pub struct Pending<T> {
    shard: ShardId,
    reply: ractor::concurrency::OneshotReceiver<Result<T, EmbeddingError>>,
}

impl<T> Pending<T> {
    /// Waits for the owner's answer.
    pub async fn wait(self) -> Result<T, ShardError> {
        match self.reply.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(ShardError::Embedding {
                shard: self.shard,
                source,
            }),
            Err(_) => Err(ShardError::Unavailable {
                shard: self.shard,
                reason: "stopped before replying".into(),
            }),
        }
    }
}

/// Where each key of one batch goes: per shard, the positions of its keys in the batch and the
/// keys. A training step computes it once for its lookup and reuses it for its gradient push:
/// the shard function (a jump hash with an unpredictable loop) is most of a split's cost.
#[derive(Debug, Clone, Default)]
pub struct ShardPlan {
    keys: usize,
    parts: Vec<(Vec<usize>, Vec<FeatureId>)>,
}

impl ShardPlan {
    /// The number of keys planned.
    pub fn len(&self) -> usize {
        self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }
}

/// Gradients of one batch in the shard owners' mailboxes ([`ShardRouter::send_gradients`]).
#[derive(Debug, Default)]
pub struct PendingGradients {
    pending: Vec<Pending<ApplyReport>>,
}

impl PendingGradients {
    /// Waits for every shard to have applied its part; returns the reports summed.
    pub async fn wait(self) -> Result<ApplyReport, ShardError> {
        let mut total = ApplyReport::default();
        for p in self.pending {
            let rep = p.wait().await?;
            total.applied += rep.applied;
            total.merged_duplicates += rep.merged_duplicates;
            total.rejected_non_finite += rep.rejected_non_finite;
            total.without_row += rep.without_row;
        }
        Ok(total)
    }
}

/// A batch's lookup in the shard owners' mailboxes ([`ShardRouter::send_lookup_for_training`]).
#[derive(Debug)]
pub struct PendingRows {
    dim: usize,
    keys: usize,
    shards: usize,
    pending: Vec<(usize, Pending<Vec<f32>>)>,
}

impl PendingRows {
    /// Waits for every shard's answer and puts the rows, `dim` floats per key, in the key
    /// order of `plan`, which must be the plan the lookup was sent with.
    pub async fn wait(self, plan: &ShardPlan) -> Result<Vec<f32>, ShardError> {
        assert!(
            plan.keys == self.keys && plan.parts.len() == self.shards,
            "rows awaited with another plan"
        );
        let dim = self.dim;
        let mut out = vec![0.0f32; plan.keys * dim];
        for (s, p) in self.pending {
            let rows = p.wait().await?;
            let pos = &plan.parts[s].0;
            if rows.len() != pos.len() * dim {
                return Err(ShardError::Unavailable {
                    shard: s as ShardId,
                    reason: format!(
                        "answered {} floats for {} keys of dim {dim}",
                        rows.len(),
                        pos.len()
                    ),
                });
            }
            for (j, &i) in pos.iter().enumerate() {
                out[i * dim..(i + 1) * dim].copy_from_slice(&rows[j * dim..(j + 1) * dim]);
            }
        }
        Ok(out)
    }
}

/// All shards of a cluster: splits a batch by [`shard_of`], asks every shard concurrently and
/// puts the answers back in the caller's key order.
#[derive(Debug, Clone)]
pub struct ShardRouter {
    shards: Vec<ShardHandle>,
}

impl ShardRouter {
    /// `shards[i]` must be the handle of shard `i`.
    pub fn new(shards: Vec<ShardHandle>) -> Self {
        assert!(!shards.is_empty(), "a router needs at least one shard");
        for (i, h) in shards.iter().enumerate() {
            assert_eq!(h.shard() as usize, i, "shard handles out of order");
        }
        Self { shards }
    }

    pub fn shards(&self) -> &[ShardHandle] {
        &self.shards
    }

    /// Spawns `count` ShardOwners in this process, each owning every table in `tables`, and
    /// returns their router. `restore[i]`, when given, is shard `i`'s starting state; a spill
    /// directory gets one subdirectory per shard.
    pub async fn spawn_local(
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        spill_dir: Option<&std::path::Path>,
        mut restore: Vec<Option<ShardSnapshot>>,
    ) -> Result<Self, ractor::SpawnErr> {
        restore.resize(count as usize, None);
        let mut shards = Vec::with_capacity(count as usize);
        for (s, snap) in (0..count).zip(restore) {
            let (h, _join) = ShardHandle::spawn(ShardArgs {
                shard: s,
                shard_count: count,
                tables: tables.clone(),
                spill_dir: spill_dir.map(|d| d.join(format!("shard-{s}"))),
                restore: snap,
                faults: Faults::default(),
            })
            .await?;
            shards.push(h);
        }
        Ok(Self::new(shards))
    }

    /// Stops every shard actor.
    pub fn stop(&self) {
        for h in &self.shards {
            h.actor().stop(None);
        }
    }

    /// Which shard owns each of `keys` (see [`ShardPlan`]).
    pub fn plan(&self, keys: &[FeatureId]) -> ShardPlan {
        let n = self.shards.len() as u32;
        if n == 1 {
            return ShardPlan {
                keys: keys.len(),
                parts: vec![((0..keys.len()).collect(), keys.to_vec())],
            };
        }
        // Room for a shard's even share and then some, so that the pushes rarely reallocate.
        let room = keys.len() / n as usize + keys.len() / 16 + 16;
        let mut parts: Vec<(Vec<usize>, Vec<FeatureId>)> = (0..n)
            .map(|_| (Vec::with_capacity(room), Vec::with_capacity(room)))
            .collect();
        for (i, &k) in keys.iter().enumerate() {
            let p = &mut parts[shard_of(k, n) as usize];
            p.0.push(i);
            p.1.push(k);
        }
        ShardPlan {
            keys: keys.len(),
            parts,
        }
    }

    /// Sends every shard its part of `plan` (`send`); [`PendingRows::wait`] puts the answers,
    /// `dim` floats per key, back in the plan's key order.
    fn send_rows(
        &self,
        plan: &ShardPlan,
        dim: usize,
        send: impl Fn(&ShardHandle, Vec<FeatureId>) -> Result<Pending<Vec<f32>>, ShardError>,
    ) -> Result<PendingRows, ShardError> {
        self.check_plan(plan);
        let mut pending = Vec::with_capacity(plan.parts.len());
        for (s, (_, ks)) in plan.parts.iter().enumerate() {
            if !ks.is_empty() {
                pending.push((s, send(&self.shards[s], ks.clone())?));
            }
        }
        Ok(PendingRows {
            dim,
            keys: plan.keys,
            shards: plan.parts.len(),
            pending,
        })
    }

    /// Whether `plan` splits keys over as many shards as this router has: [`shard_of`]
    /// depends on nothing else, so such a plan sends every key to its owner here.
    pub fn fits(&self, plan: &ShardPlan) -> bool {
        plan.parts.len() == self.shards.len()
    }

    /// A plan made by another router would send keys to shards that do not own them.
    fn check_plan(&self, plan: &ShardPlan) {
        assert_eq!(
            plan.parts.len(),
            self.shards.len(),
            "a shard plan made for another shard count"
        );
    }

    pub async fn lookup(
        &self,
        table: &TableName,
        dim: usize,
        keys: &[FeatureId],
    ) -> Result<Vec<f32>, ShardError> {
        let plan = self.plan(keys);
        self.send_rows(&plan, dim, |h, ks| h.send_lookup(table, ks))?
            .wait(&plan)
            .await
    }

    pub async fn lookup_for_training(
        &self,
        table: &TableName,
        dim: usize,
        keys: &[FeatureId],
        ctx: TrainCtx,
    ) -> Result<Vec<f32>, ShardError> {
        self.lookup_for_training_planned(table, dim, &self.plan(keys), ctx)
            .await
    }

    /// [`ShardRouter::lookup_for_training`] of the keys `plan` was made from.
    pub async fn lookup_for_training_planned(
        &self,
        table: &TableName,
        dim: usize,
        plan: &ShardPlan,
        ctx: TrainCtx,
    ) -> Result<Vec<f32>, ShardError> {
        self.send_lookup_for_training(table, dim, plan, ctx)?
            .wait(plan)
            .await
    }

    /// Puts each shard's part of `plan`'s training lookup in its owner's mailbox before
    /// returning, behind whatever was sent to it before (a previous step's gradients, say);
    /// the rows come with [`PendingRows::wait`].
    pub fn send_lookup_for_training(
        &self,
        table: &TableName,
        dim: usize,
        plan: &ShardPlan,
        ctx: TrainCtx,
    ) -> Result<PendingRows, ShardError> {
        self.send_rows(plan, dim, |h, ks| {
            h.send_lookup_for_training(table, ks, ctx)
        })
    }

    /// Sends each shard its keys' gradients; returns the reports summed.
    pub async fn apply_gradients(
        &self,
        table: &TableName,
        dim: usize,
        keys: &[FeatureId],
        grads: &[f32],
        ctx: TrainCtx,
    ) -> Result<ApplyReport, ShardError> {
        self.send_gradients(table, dim, &self.plan(keys), grads, ctx)?
            .wait()
            .await
    }

    /// Puts each shard's part of `grads` (`dim` floats per key of `plan`, in the plan's key
    /// order) in its owner's mailbox before returning; the answers come with
    /// [`PendingGradients::wait`]. What any caller sends a shard after this returns sees the
    /// gradients applied (see [`ShardHandle::send_gradients`]).
    pub fn send_gradients(
        &self,
        table: &TableName,
        dim: usize,
        plan: &ShardPlan,
        grads: &[f32],
        ctx: TrainCtx,
    ) -> Result<PendingGradients, ShardError> {
        self.check_plan(plan);
        assert_eq!(
            grads.len(),
            plan.keys * dim,
            "{dim} gradient floats per planned key"
        );
        let mut pending = Vec::with_capacity(plan.parts.len());
        for (s, (pos, ks)) in plan.parts.iter().enumerate() {
            if ks.is_empty() {
                continue;
            }
            let mut g = Vec::with_capacity(ks.len() * dim);
            for &i in pos {
                g.extend_from_slice(&grads[i * dim..(i + 1) * dim]);
            }
            pending.push(self.shards[s].send_gradients(table, ks.clone(), g, ctx)?);
        }
        Ok(PendingGradients { pending })
    }

    pub async fn stats(&self) -> Result<Vec<ShardStats>, ShardError> {
        let mut out = Vec::with_capacity(self.shards.len());
        for h in &self.shards {
            out.push(h.stats().await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::fixtures::user_item_tables as tables;

    async fn cluster(n: u32) -> ShardRouter {
        let mut hs = Vec::new();
        for s in 0..n {
            let (h, _) = ShardHandle::spawn(ShardArgs {
                shard: s,
                shard_count: n,
                tables: tables(),
                spill_dir: None,
                restore: None,
                faults: Faults::default(),
            })
            .await
            .unwrap();
            hs.push(h);
        }
        ShardRouter::new(hs)
    }

    #[tokio::test]
    async fn sharded_training_equals_one_shard_and_keys_stay_home() {
        let seed = crate::testkit::seed("sharded_training_equals_one_shard");
        let mut rng = crate::rng::Xoshiro256::seed_from_u64(seed);
        let three = cluster(3).await;
        let one = cluster(1).await;
        let user = TableName::new("user");
        let item = TableName::new("item");
        for step in 0..30u64 {
            let ctx = TrainCtx::at_step(step);
            let keys: Vec<u64> = (0..200).map(|_| rng.below(1000)).collect();
            for (t, dim) in [(&user, 8), (&item, 4)] {
                let a = three.lookup_for_training(t, dim, &keys, ctx).await.unwrap();
                let b = one.lookup_for_training(t, dim, &keys, ctx).await.unwrap();
                assert_eq!(a, b, "seed {seed} step {step}");
                let grads: Vec<f32> = (0..keys.len() * dim)
                    .map(|_| rng.next_f32() - 0.5)
                    .collect();
                let ra = three
                    .apply_gradients(t, dim, &keys, &grads, ctx)
                    .await
                    .unwrap();
                let rb = one
                    .apply_gradients(t, dim, &keys, &grads, ctx)
                    .await
                    .unwrap();
                assert_eq!(ra.applied, rb.applied);
            }
        }
        let probe: Vec<u64> = (0..1000).collect();
        assert_eq!(
            three.lookup(&user, 8, &probe).await.unwrap(),
            one.lookup(&user, 8, &probe).await.unwrap()
        );
        // Every shard holds only its own keys, and together they hold them all.
        let mut total = 0;
        for h in three.shards() {
            let snap = h.snapshot().await.unwrap();
            for t in &snap.tables {
                for &k in &t.rows.keys {
                    assert_eq!(shard_of(k, 3), h.shard(), "key {k} on the wrong shard");
                }
                total += t.rows.len();
            }
        }
        let one_snap = one.shards()[0].snapshot().await.unwrap();
        assert_eq!(
            total,
            one_snap.tables.iter().map(|t| t.rows.len()).sum::<usize>()
        );
        let stats = three.stats().await.unwrap();
        assert!(stats.iter().all(|s| s.counters.training_lookups > 0));
    }

    /// Gradients sent and not yet awaited are applied before any later request: a lookup sent
    /// right after them reads what a lookup after awaiting them reads.
    #[tokio::test]
    async fn a_lookup_after_sent_gradients_sees_them() {
        let seed = crate::testkit::seed("lookup_after_sent_gradients");
        let mut rng = crate::rng::Xoshiro256::seed_from_u64(seed);
        let piped = cluster(3).await;
        let waited = cluster(3).await;
        let user = TableName::new("user");
        for step in 0..20u64 {
            let ctx = TrainCtx::at_step(step);
            let keys: Vec<u64> = (0..300).map(|_| rng.below(2000)).collect();
            let plan = piped.plan(&keys);
            assert_eq!(plan.len(), keys.len());
            let a = piped
                .lookup_for_training_planned(&user, 8, &plan, ctx)
                .await
                .unwrap();
            let b = waited
                .lookup_for_training(&user, 8, &keys, ctx)
                .await
                .unwrap();
            assert_eq!(a, b, "seed {seed} step {step}");
            let grads: Vec<f32> = (0..keys.len() * 8).map(|_| rng.next_f32() - 0.5).collect();
            // Not awaited before the next lookup.
            let pending = piped.send_gradients(&user, 8, &plan, &grads, ctx).unwrap();
            let want = waited
                .apply_gradients(&user, 8, &keys, &grads, ctx)
                .await
                .unwrap();
            let probe: Vec<u64> = keys.iter().map(|k| k + 1).collect();
            assert_eq!(
                piped.lookup(&user, 8, &probe).await.unwrap(),
                waited.lookup(&user, 8, &probe).await.unwrap(),
                "seed {seed} step {step}"
            );
            let rep = pending.wait().await.unwrap();
            assert_eq!(rep.applied, want.applied, "seed {seed} step {step}");
            assert_eq!(rep.merged_duplicates, want.merged_duplicates);
        }
        let all: Vec<u64> = (0..2001).collect();
        assert_eq!(
            piped.lookup(&user, 8, &all).await.unwrap(),
            waited.lookup(&user, 8, &all).await.unwrap(),
            "seed {seed}"
        );
        piped.stop();
        waited.stop();
    }

    #[tokio::test]
    async fn errors_come_back_typed_and_the_shard_keeps_serving() {
        let r = cluster(2).await;
        let h = &r.shards()[0];
        let err = h
            .lookup(&TableName::new("nope"), vec![1])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ShardError::Embedding {
                    source: EmbeddingError::UnknownTable(_),
                    ..
                }
            ),
            "{err}"
        );
        let err = h
            .apply_gradients(
                &TableName::new("user"),
                vec![1, 2],
                vec![0.0; 3],
                TrainCtx::default(),
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("gradient block has 3 floats"),
            "{err}"
        );
        assert_eq!(
            h.lookup(&TableName::new("user"), vec![1])
                .await
                .unwrap()
                .len(),
            8
        );
        assert_eq!(h.stats().await.unwrap().counters.errors, 2);
        // A stopped shard answers Unavailable, not a hang or a panic.
        h.actor().stop(None);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while h.actor().get_status() != ractor::ActorStatus::Stopped {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("shard stops");
        let err = h
            .lookup(&TableName::new("user"), vec![1])
            .await
            .unwrap_err();
        assert!(matches!(err, ShardError::Unavailable { .. }), "{err}");
    }

    #[tokio::test]
    async fn restart_from_snapshot_resumes_the_same_state() {
        let r = cluster(1).await;
        let user = TableName::new("user");
        let keys: Vec<u64> = (0..100).collect();
        r.lookup_for_training(&user, 8, &keys, TrainCtx::at_step(1))
            .await
            .unwrap();
        r.apply_gradients(&user, 8, &keys, &vec![0.1; 800], TrainCtx::at_step(1))
            .await
            .unwrap();
        let snap = r.shards()[0].snapshot().await.unwrap();
        let before = r.lookup(&user, 8, &keys).await.unwrap();
        r.shards()[0].actor().stop(None);
        let (h, _) = ShardHandle::spawn(ShardArgs {
            shard: 0,
            shard_count: 1,
            tables: tables(),
            spill_dir: None,
            restore: Some(snap.clone()),
            faults: Faults::default(),
        })
        .await
        .unwrap();
        let mut after = h.snapshot().await.unwrap();
        assert_eq!(
            after, snap,
            "the restarted shard starts exactly at the snapshot"
        );
        assert_eq!(h.lookup(&user, keys.clone()).await.unwrap(), before);
        // The lookup only moved the access counters; the model is unchanged.
        after = h.snapshot().await.unwrap();
        assert_eq!(after.tables[0].rows, snap.tables[0].rows);
    }
}
