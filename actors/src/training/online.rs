//! The online Trainer actor: pulls batches of samples from the sample log, trains through the
//! ShardOwners, and captures versions that record exactly which samples they hold.
//!
//! - **Takes in:** nothing from other actors' traffic. It *pulls* from the sample log, one
//!   batch per step, and sends itself the next `Pull` only after a step is done. A producer
//!   ten times faster than training grows the log's backlog on disk, never a mailbox; the
//!   shards see one batch of requests in flight at a time.
//! - **Sends out:** lookups and gradients to the shards (awaited), captures to the
//!   CheckpointWriter when it is due, refused samples to `sample-rejects`.
//! - **Keeps:** the dense net, the feed's offsets, the rows trained and refused.
//! - **Restart.** `pre_start` builds everything from [`TrainerArgs`]: it restores *every*
//!   shard and the dense net to `start.version`, or to the newest older version that verifies
//!   when it does not (setting the bad ones aside), or empties the shards for a fresh model,
//!   tells the writer its next version is full, and resumes from that version's offsets.
//!   So samples after those offsets are applied exactly once, whatever state the shards were
//!   in when the old trainer died.
//!
//! Fault points: `trainer.batch` (before a step).
//!
//! Architecture invariant: for every version the trainer captures,
//! `rows_trained + samples_rejected` minus the replays' rows equals the sum of its
//! `sample_offsets` minus the offsets it started the lineage from. No version is captured
//! while a replay runs, so a version never holds half a replay.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use super::feed::{ReplayPlan, SampleFeed};
use super::{FreshModel, Lineage, Trainer};
use crate::ckpt::writer::{CheckpointHandle, StepBoundary};
use crate::ckpt::{ModelStore, ReplayRecord};
use crate::dense::Threads;
use crate::embedding::TableConfig;
use crate::envelope::Envelope;
use crate::event::DeadLetter;
use crate::fault::Faults;
use crate::sample::SampleBlock;
use crate::shard::ShardRouter;
use crate::stream::{Offset, StreamLog};
use crate::telemetry;

/// Where a (re)started trainer begins.
#[derive(Clone, Debug, Default)]
pub struct TrainStart {
    /// The version to restore; `None` starts the fresh model with every offset at 0.
    pub version: Option<u64>,
    /// Replayed before live consumption resumes.
    pub replay: Option<ReplayPlan>,
}

#[derive(Clone, Debug)]
pub struct TrainerArgs {
    pub store: ModelStore,
    pub samples: Arc<dyn StreamLog>,
    /// Where refused samples go, one partition per sample partition.
    pub rejects: Arc<dyn StreamLog>,
    pub shards: ShardRouter,
    pub writer: CheckpointHandle,
    pub start: TrainStart,
    pub fresh: FreshModel,
    /// Samples per step.
    pub batch: usize,
    pub threads: Arc<Threads>,
    pub faults: Faults,
}

/// The trainer's observable state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerStatus {
    /// The version this trainer started from.
    pub started_from: Option<u64>,
    pub step: u64,
    pub rows_trained: u64,
    pub samples_rejected: u64,
    /// Per sample partition, the next offset to consume.
    pub offsets: BTreeMap<u32, Offset>,
    /// Per sample partition, the offset this incarnation started from: the restored
    /// version's, or empty for a fresh model.
    #[serde(default)]
    pub start_offsets: BTreeMap<u32, Offset>,
    /// Samples in the log not yet consumed; `None` when the log could not say (see
    /// `lag_error`).
    pub lag: Option<u64>,
    /// Why the lag is unknown: the log's error.
    pub lag_error: Option<String>,
    pub replaying: bool,
    /// Steps this incarnation took, and the largest.
    pub steps: u64,
    pub max_step_rows: usize,
    /// Training loss, exponentially averaged over recent steps.
    pub loss: f64,
    pub samples_per_sec: f64,
    pub captures: u64,
    pub capture_failures: u64,
}

#[derive(Debug)]
pub enum TrainerRequest {
    /// Take the next step (sent to itself).
    Pull,
    Status(RpcReplyPort<TrainerStatus>),
    /// Capture a last version of everything trained, wait until it is written, and reply
    /// with the newest version.
    Finish(RpcReplyPort<Result<Option<u64>, FinishError>>),
}

/// Why a trainer could not finish: its last version may not be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum FinishError {
    /// The checkpoint writer did not confirm the write.
    #[error("{reason}")]
    Writer { reason: String },
}

pub type TrainerMsg = Envelope<TrainerRequest>;

#[derive(Debug, Default)]
pub struct TrainerActor;

#[derive(Debug)]
pub struct TrainerActorState {
    args: TrainerArgs,
    trainer: Trainer,
    feed: SampleFeed,
    block: SampleBlock,
    tables: BTreeMap<String, TableConfig>,
    rows_trained: u64,
    samples_rejected: u64,
    replays: Vec<ReplayRecord>,
    /// Per partition, the highest sample offset already dead-lettered (after a restart the
    /// same refusals come round again and must not be written twice).
    rejected_through: BTreeMap<u32, Offset>,
    /// Trained since the last capture.
    dirty: bool,
    status: TrainerStatus,
    rate_since: Instant,
    rate_rows: u64,
}

/// Idle wait before looking at the log again when it had nothing.
const IDLE: Duration = Duration::from_millis(5);

impl TrainerActorState {
    fn boundary(&mut self) -> StepBoundary {
        let lineage = Lineage {
            rows_trained: self.rows_trained,
            samples_rejected: self.samples_rejected,
            replays: std::mem::take(&mut self.replays),
            sample_offsets: self.feed.offsets().clone(),
        };
        super::boundary(&self.trainer, &self.tables, lineage)
    }

    async fn capture(&mut self) {
        let at = self.boundary();
        let replays = at.meta.replays.clone();
        match self.args.writer.capture(at).await {
            Ok(()) => {
                self.dirty = false;
                self.status.captures += 1;
            }
            Err(e) => {
                // The rows stay trained; the next due capture includes them.
                tracing::warn!(error = %e, "capture failed; retrying at the next boundary");
                self.replays = replays;
                self.status.capture_failures += 1;
            }
        }
    }

    /// Writes refusals not already dead-lettered by an earlier incarnation.
    fn dead_letter(&mut self, rejected: Vec<DeadLetter>) -> anyhow::Result<()> {
        let mut by_partition: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
        for d in rejected {
            let through = self.rejected_through.get(&d.partition).copied();
            if through.is_some_and(|t| d.offset <= t) {
                continue;
            }
            self.rejected_through.insert(d.partition, d.offset);
            by_partition
                .entry(d.partition)
                .or_default()
                .push(d.to_msgpack());
        }
        for (p, recs) in by_partition {
            let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
            self.args
                .rejects
                .append(p % self.args.rejects.partitions(), &refs)
                .with_context(|| format!("dead-lettering refused samples of partition {p}"))?;
        }
        Ok(())
    }

    async fn step(&mut self, myself: &ActorRef<TrainerMsg>) -> anyhow::Result<()> {
        self.args.faults.check("trainer.batch");
        // Up to the next dense update, so updates fall at the same samples at any rate.
        let want = self
            .trainer
            .rows_to_update()
            .map_or(self.args.batch, |n| n.min(self.args.batch));
        let pulled = self
            .feed
            .pull(&*self.args.samples, want, &mut self.block)
            .context("reading the sample log")?;
        let consumed = pulled.rows + pulled.rejected.len();
        self.samples_rejected += pulled.rejected.len() as u64;
        // A replay's refusals were dead-lettered when first consumed.
        if !pulled.from_replay {
            self.dead_letter(pulled.rejected)?;
        }
        if pulled.rows > 0 {
            // Hundreds of steps a second: the sampler's ratio decides which are kept, and an
            // unkept one makes no child spans.
            let span = if telemetry::enabled() {
                tracing::info_span!(target: telemetry::TARGET, "train.step",
                    freshet.step = self.trainer.step() as i64 + 1, freshet.rows = pulled.rows as i64,
                    freshet.replay = pulled.from_replay)
            } else {
                tracing::Span::none()
            };
            let rep = self
                .trainer
                .train_batch_traced(
                    &self.block,
                    0..pulled.rows,
                    None,
                    &self.args.shards,
                    &self.args.threads,
                    &span,
                )
                .await
                .context("training step")?;
            self.rows_trained += rep.rows as u64;
            let s = &mut self.status;
            s.steps += 1;
            s.max_step_rows = s.max_step_rows.max(rep.rows);
            let loss = rep.loss_sum / rep.rows.max(1) as f64;
            s.loss = if s.steps == 1 {
                loss
            } else {
                0.95 * s.loss + 0.05 * loss
            };
            self.rate_rows += rep.rows as u64;
        }
        if consumed > 0 {
            self.dirty = true;
        }
        if let Some(done) = pulled.replay_done {
            tracing::info!(partition = done.partition, from = done.from, to = done.to, skip = ?done.skip, rows = done.rows, "replay finished");
            self.replays.push(done);
            self.args.writer.demand();
        }
        let el = self.rate_since.elapsed().as_secs_f64();
        if el >= 1.0 {
            self.status.samples_per_sec = self.rate_rows as f64 / el;
            self.rate_rows = 0;
            self.rate_since = Instant::now();
        }
        if self.dirty && !self.feed.replaying() && self.args.writer.due(self.trainer.step()) {
            // A version holds the gradients of every step before it.
            self.trainer.flush().await.context("training step")?;
            self.capture().await;
        }
        if consumed == 0 {
            myself.send_after(IDLE, || Envelope::new(TrainerRequest::Pull));
        } else {
            myself.cast(Envelope::new(TrainerRequest::Pull))?;
        }
        Ok(())
    }
}

/// The last sample offset each partition of the rejects topic holds a dead letter for.
fn rejected_through(rejects: &dyn StreamLog) -> anyhow::Result<BTreeMap<u32, Offset>> {
    let mut out = BTreeMap::new();
    for p in 0..rejects.partitions() {
        let high = rejects.high_watermark(p)?;
        if high == 0 || rejects.low_watermark(p)? >= high {
            continue;
        }
        for rec in rejects.read(p, high - 1, 1)? {
            // Written by this actor; one it cannot read is left for the operator.
            match DeadLetter::from_msgpack(&rec.payload) {
                Ok(d) => {
                    out.insert(d.partition, d.offset);
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "unreadable dead letter at the end of sample-rejects")
                }
            }
        }
    }
    Ok(out)
}

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = TrainerActorState;
    type Arguments = TrainerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TrainerMsg>,
        args: TrainerArgs,
    ) -> Result<TrainerActorState, ActorProcessingErr> {
        if args.batch == 0 {
            return Err("the batch size must be positive".into());
        }
        // Every (re)start of the trainer is a supervision event: where it resumes from.
        let span = if telemetry::enabled() {
            tracing::info_span!(target: telemetry::TARGET, "supervision.trainer_start",
                freshet.asked_version = args.start.version.map(|v| v as i64),
                freshet.replay = ?args.start.replay,
                freshet.version = tracing::field::Empty,
                freshet.sample_offsets = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        // Whatever the writer last wrote, the shards are about to hold another state.
        args.writer.reset().await?;
        let restored = match args.start.version {
            // With its causes: the supervisor's log and /healthz show only this error's text.
            Some(v) => super::restore_newest_good(&args.store, &args.shards, v)
                .await
                .map_err(|e| format!("{e:#}"))?,
            None => None,
        };
        let started_from = restored.as_ref().map(|(_, m)| m.version);
        let (trainer, tables, rows, rejected, offsets) = match restored {
            Some((t, m)) => {
                tracing::info!(
                    version = m.version,
                    step = m.step,
                    rows = m.rows_trained,
                    "trainer resumes"
                );
                (
                    t,
                    m.tables,
                    m.rows_trained,
                    m.samples_rejected,
                    m.sample_offsets,
                )
            }
            None => {
                for h in args.shards.shards() {
                    h.reset().await?;
                }
                let f = &args.fresh;
                let t = Trainer::new(f.schema.clone(), f.model.clone())?;
                tracing::info!("trainer starts a fresh model");
                (t, f.tables.clone(), 0, 0, BTreeMap::new())
            }
        };
        let mut trainer = trainer;
        trainer.set_samples_per_update(args.batch);
        let schema = trainer.schema().clone();
        let start_offsets = offsets.clone();
        if let Some(v) = started_from {
            span.record("freshet.version", v as i64);
        }
        span.record(
            "freshet.sample_offsets",
            tracing::field::debug(&start_offsets),
        );
        drop(span);
        let feed = SampleFeed::new(
            &schema,
            args.samples.partitions(),
            offsets,
            args.start.replay.clone(),
        );
        let rejected_through = rejected_through(&*args.rejects)?;
        let mut st = TrainerActorState {
            block: SampleBlock::for_schema(&schema),
            trainer,
            feed,
            tables,
            rows_trained: rows,
            samples_rejected: rejected,
            replays: Vec::new(),
            rejected_through,
            dirty: false,
            status: TrainerStatus {
                started_from,
                start_offsets,
                ..TrainerStatus::default()
            },
            rate_since: Instant::now(),
            rate_rows: 0,
            args,
        };
        if started_from.is_none() {
            // The fresh model is a version too: a trainer restarted before its first capture
            // resumes from it instead of from shards that already learned something.
            st.capture().await;
            if st.status.captures != 1 {
                return Err("could not capture the fresh model".into());
            }
        }
        myself.cast(Envelope::new(TrainerRequest::Pull))?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<TrainerMsg>,
        msg: TrainerMsg,
        st: &mut TrainerActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg.body {
            TrainerRequest::Pull => st.step(&myself).await?,
            TrainerRequest::Status(reply) => {
                let mut s = st.status.clone();
                s.step = st.trainer.step();
                s.rows_trained = st.rows_trained;
                s.samples_rejected = st.samples_rejected;
                s.offsets = st.feed.offsets().clone();
                match st.feed.lag(&*st.args.samples) {
                    Ok(lag) => (s.lag, s.lag_error) = (Some(lag), None),
                    Err(e) => (s.lag, s.lag_error) = (None, Some(e.to_string())),
                }
                s.replaying = st.feed.replaying();
                let _ = reply.send(s);
            }
            TrainerRequest::Finish(reply) => {
                let r = async {
                    if st.dirty && !st.feed.replaying() {
                        st.capture().await;
                    }
                    let w = st
                        .args
                        .writer
                        .flush()
                        .await
                        .map_err(|e| FinishError::Writer {
                            reason: e.to_string(),
                        })?;
                    Ok(w.last_version.or(st.args.store.latest().ok().flatten()))
                }
                .await;
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

/// A typed handle to the running trainer.
#[derive(Clone, Debug)]
pub struct TrainerActorHandle {
    actor: ActorRef<TrainerMsg>,
}

impl TrainerActorHandle {
    pub async fn spawn_linked(args: TrainerArgs, supervisor: ActorCell) -> anyhow::Result<Self> {
        let (actor, _join) = Actor::spawn_linked(None, TrainerActor, args, supervisor)
            .await
            .map_err(|e| anyhow::anyhow!("starting the trainer: {e}"))?;
        Ok(Self { actor })
    }

    pub async fn spawn(args: TrainerArgs) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (actor, join) = Actor::spawn(None, TrainerActor, args)
            .await
            .map_err(|e| anyhow::anyhow!("starting the trainer: {e}"))?;
        Ok((Self { actor }, join))
    }

    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    pub async fn status(&self) -> anyhow::Result<TrainerStatus> {
        match self
            .actor
            .call(|r| Envelope::new(TrainerRequest::Status(r)), None)
            .await
        {
            Ok(CallResult::Success(s)) => Ok(s),
            Ok(_) => anyhow::bail!("the trainer stopped before replying"),
            Err(e) => anyhow::bail!("the trainer is not running: {e}"),
        }
    }

    /// Writes a last version of everything trained and returns the newest version.
    pub async fn finish(&self) -> anyhow::Result<Option<u64>> {
        match self
            .actor
            .call(|r| Envelope::new(TrainerRequest::Finish(r)), None)
            .await
        {
            Ok(CallResult::Success(r)) => r.map_err(anyhow::Error::new),
            Ok(_) => anyhow::bail!("the trainer stopped before replying"),
            Err(e) => anyhow::bail!("the trainer is not running: {e}"),
        }
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
