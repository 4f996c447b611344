//! [`ShardHandle`]: the typed handle to one ShardOwner, and [`Pending`], an answer still in
//! its mailbox.

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};

use crate::ckpt::ModelStore;
use crate::embedding::{ApplyReport, Changes, EmbeddingError, ShardDelta, ShardSnapshot, TrainCtx};
use crate::envelope::{Envelope, TraceContext};
use crate::ids::{FeatureId, ShardId, TableName};
use crate::telemetry;

use super::*;

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
    /// one worker (`examples/owner_wake.rs` measures both; `docs/design-notes.md` has the
    /// figures). A thread per owner is woken
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
        self.send_lookup_for_training(table, keys, ctx, &tracing::Span::none())?
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

    /// [`ShardHandle::lookup_for_training`], sent now and answered later. When `step` is a
    /// sampled span, the request gets a client span under it that ends with the answer, and
    /// the owner's span, on whichever node it runs, continues it.
    pub fn send_lookup_for_training(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
        ctx: TrainCtx,
        step: &tracing::Span,
    ) -> Result<Pending<Vec<f32>>, ShardError> {
        let span = telemetry::child_of(step, || {
            tracing::info_span!(target: telemetry::TARGET, parent: None, "shard.lookup",
                otel.kind = "client", freshet.shard = i64::from(self.shard), freshet.table = %table,
                freshet.keys = keys.len() as i64, freshet.step = ctx.step as i64)
        });
        let table = table.clone();
        let pending = self.send(telemetry::context_of(&span), |reply| {
            ShardRequest::LookupForTraining {
                table,
                keys,
                ctx,
                reply,
            }
        })?;
        Ok(pending.ending(span))
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
            span: tracing::Span::none(),
        })
    }

    pub async fn apply_gradients(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
        grads: Vec<f32>,
        ctx: TrainCtx,
    ) -> Result<ApplyReport, ShardError> {
        self.send_gradients(table, keys, grads, ctx, &tracing::Span::none())?
            .wait()
            .await
    }

    /// The gradients, sent now and answered later: every request sent to this owner after
    /// this returns sees them applied.
    /// With `step` a sampled span, the push gets a client span under it, ended once sent, and
    /// the owner's span continues it.
    pub fn send_gradients(
        &self,
        table: &TableName,
        keys: Vec<FeatureId>,
        grads: Vec<f32>,
        ctx: TrainCtx,
        step: &tracing::Span,
    ) -> Result<Pending<ApplyReport>, ShardError> {
        let span = telemetry::child_of(step, || {
            tracing::info_span!(target: telemetry::TARGET, parent: None, "shard.push",
                otel.kind = "client", freshet.shard = i64::from(self.shard), freshet.table = %table,
                freshet.keys = keys.len() as i64, freshet.step = ctx.step as i64)
        });
        let table = table.clone();
        let pending = self.send(telemetry::context_of(&span), |reply| {
            ShardRequest::ApplyGradients {
                table,
                keys,
                grads,
                ctx,
                reply,
            }
        })?;
        // The push's span ends once it is in the owner's mailbox: the step does not wait for
        // it (see `Trainer::flush`), and the owner's span shows when it was applied.
        drop(span);
        Ok(pending)
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
    /// The request's client span, if traced: it ends when the answer is in.
    span: tracing::Span,
}

impl<T> Pending<T> {
    fn ending(mut self, span: tracing::Span) -> Self {
        self.span = span;
        self
    }

    /// Waits for the owner's answer.
    pub async fn wait(self) -> Result<T, ShardError> {
        let answer = self.reply.await;
        drop(self.span);
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(EmbeddingError::Unreachable(reason))) => Err(ShardError::Unavailable {
                shard: self.shard,
                reason,
            }),
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
