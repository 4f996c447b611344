//! The CheckpointWriter actor: takes versions of the model and writes them to the store.
//!
//! - **Takes in:** a capture request at a training-step boundary (the dense state, the step
//!   and the offsets, from the trainer), subscriptions, and flushes (which return the counters).
//! - **Asks:** every ShardOwner, through the [`ShardRouter`] it was built with, for its
//!   snapshot (full version) or its changes since the last written version (delta).
//! - **Sends out:** each new version's manifest to every subscriber.
//! - **Keeps:** the last durable version and the table versions it holds, which is where the
//!   next delta starts; counters.
//!
//! **Consistency.** The trainer asks for a capture between two steps and waits for the
//! capture's reply before its next step. Only the trainer changes the shards, so the dense
//! state it hands over and the rows the shards hand over belong to the same step. The reply
//! comes as soon as the shards have answered; the write to disk follows, and the trainer goes
//! on training meanwhile. A next capture waits in the mailbox until the write is done, which
//! bounds the memory held by captures to one version.
//!
//! **Failure.** A write that fails is logged and counted here; the next version is then a
//! delta from the last *durable* one (its change history is only dropped after a write
//! succeeds), so no change is ever lost to a failed write.
//!
//! **Restart.** Built from [`WriterArgs`] alone; a restarted writer starts with a full version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;

use super::{Manifest, ModelStore, Payload, VersionMeta};
use crate::dense::DenseState;
use crate::envelope::{Envelope, TraceContext};
use crate::fault::Faults;
use crate::ids::{ShardId, TableName};
use crate::shard::{ShardError, ShardRouter};
use crate::stream::StreamLog;
use crate::telemetry;

/// When versions are taken. Pure: the trainer asks it at every step boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// A version every this many steps (`None`: not by steps).
    pub every_steps: Option<u64>,
    /// A version at least this often (`None`: not by time). Down to 1 s.
    pub every: Option<Duration>,
    /// After this many deltas the next version is full, which bounds restore chains.
    pub full_every: u32,
    /// Full versions (with their deltas) retention keeps.
    pub keep_full: usize,
    /// Bytes the kept versions may take: past it, whole chains go, oldest first (never the
    /// newest chain or a pinned one). `None`: no bound.
    pub keep_bytes: Option<u64>,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            every_steps: None,
            every: Some(Duration::from_secs(10)),
            full_every: 60,
            keep_full: 3,
            keep_bytes: None,
        }
    }
}

/// Where the schedule stands: the last capture's step and time.
#[derive(Debug)]
struct Due {
    schedule: Schedule,
    last_step: u64,
    last_at: Instant,
}

impl Due {
    fn due(&self, step: u64, now: Instant) -> bool {
        self.schedule
            .every_steps
            .is_some_and(|n| step >= self.last_step + n.max(1))
            || self
                .schedule
                .every
                .is_some_and(|d| now.duration_since(self.last_at) >= d)
    }
}

/// What the trainer hands over at a step boundary.
#[derive(Debug, Serialize, Deserialize)]
pub struct StepBoundary {
    pub meta: VersionMeta,
    pub dense: DenseState,
    /// Take a full version whatever the schedule says.
    pub full: bool,
}

#[derive(Debug, Error)]
pub enum WriterError {
    #[error("capturing the shards: {0}")]
    Shard(#[from] ShardError),
    /// The writer could not capture this version (a shard refused or was unavailable).
    #[error("checkpoint capture failed: {0}")]
    Capture(CaptureError),
    #[error("checkpoint writer unavailable: {0}")]
    Unavailable(String),
}

/// Why the writer could not capture a version, as it answers a capture (and as the answer
/// crosses nodes). The trainer keeps its rows either way and captures at the next boundary.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum CaptureError {
    /// A shard refused its snapshot or delta; the same request would fail again.
    #[error("capturing the shards: shard {shard}: {reason}")]
    Refused { shard: ShardId, reason: String },
    /// A shard did not answer: stopped, restarting or gone.
    #[error("capturing the shards: shard {shard} unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
}

impl From<&ShardError> for CaptureError {
    fn from(e: &ShardError) -> Self {
        match e {
            ShardError::Unavailable { shard, reason } => Self::Unavailable {
                shard: *shard,
                reason: reason.clone(),
            },
            ShardError::Embedding { shard, source } => Self::Refused {
                shard: *shard,
                reason: source.to_string(),
            },
            ShardError::Restore { shard, source } => Self::Refused {
                shard: *shard,
                reason: source.to_string(),
            },
        }
    }
}

/// Counters: the writer's observable state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WriterStats {
    pub captures: u64,
    pub full_written: u64,
    pub deltas_written: u64,
    pub write_failures: u64,
    pub bytes_written: u64,
    pub versions_deleted: u64,
    pub last_version: Option<u64>,
    pub last_write_ms: f64,
    pub last_error: Option<String>,
    /// The newest full version takes more than a quarter of `keep_bytes`: the store cannot
    /// hold two chains within its bound, and goes past it.
    #[serde(default)]
    pub store_over_bound: bool,
}

/// Construction inputs; a restart builds the state from these again.
#[derive(Debug, Clone)]
pub struct WriterArgs {
    pub store: ModelStore,
    pub shards: ShardRouter,
    pub schedule: Schedule,
    /// The sample log the versions' offsets point into. After each version the writer holds
    /// it, against the log's retention, from the oldest kept version's offsets on, so every
    /// version the store keeps can be restored and trained forward exactly once.
    pub samples: Option<Arc<dyn StreamLog>>,
    /// Fault points for supervision tests: `writer.write` (before a version is written).
    pub faults: Faults,
}

/// The bytes a chain may take before the next version starts a new one, under a bound of
/// `keep_bytes` on the store and with a full version of `full_bytes` at its head.
///
/// Retention never deletes the newest chain, so the chain's bound is what keeps the store
/// within its bytes: half of `keep_bytes`, the other half for older versions to roll back to.
/// A full version larger than a quarter of `keep_bytes` leaves no room for that; then a chain
/// may grow to twice its full version. Starting over at every version instead would write a
/// whole copy of the tables each time, which on large tables takes the CPU and the disk from
/// training; this way the full versions cost at most as many bytes as the deltas between
/// them, and the store stays within about four full versions.
pub(crate) fn chain_bound(keep_bytes: Option<u64>, full_bytes: u64) -> u64 {
    keep_bytes.map_or(u64::MAX, |b| (b / 2).max(full_bytes.saturating_mul(2)))
}

/// The retention holder name of the model store on the sample log.
pub const RETENTION_HOLDER: &str = "model-store";

#[derive(Debug)]
pub enum WriterRequest {
    Capture {
        at: Box<StepBoundary>,
        reply: RpcReplyPort<Result<(), CaptureError>>,
    },
    /// Each new version's manifest, in the envelope of the version's trace.
    Subscribe {
        tx: mpsc::UnboundedSender<Envelope<Manifest>>,
    },
    /// Replies once every capture before it is written (or failed).
    Flush { reply: RpcReplyPort<WriterStats> },
    /// The shards were restored to another state: the next version must be full.
    Reset { reply: RpcReplyPort<()> },
}

pub type WriterMsg = Envelope<WriterRequest>;

#[derive(Debug, Default)]
pub struct CheckpointWriter;

/// The last durable version and every shard's table versions in it.
#[derive(Debug, Clone)]
struct Durable {
    version: u64,
    tables: Vec<Vec<(TableName, u64)>>,
    deltas_since_full: u32,
    /// Bytes of its chain: its full version and the deltas after it, itself included.
    chain_bytes: u64,
    /// Bytes of its chain's full version.
    full_bytes: u64,
    /// Its dense state: the next delta stores its own as a diff from this one.
    dense: Arc<DenseState>,
}

#[derive(Debug)]
pub struct WriterState {
    args: WriterArgs,
    last: Option<Durable>,
    subscribers: Vec<mpsc::UnboundedSender<Envelope<Manifest>>>,
    stats: WriterStats,
    /// Sample offsets of the kept versions, read once per version rather than at every hold.
    kept_offsets: BTreeMap<u64, BTreeMap<u32, u64>>,
}

impl WriterState {
    async fn capture(&self, at: &StepBoundary) -> Result<Payload, ShardError> {
        let shards = self.args.shards.shards();
        // A delta needs a durable parent; after `full_every` deltas, or once the chain takes
        // its bound, the chain starts over.
        let schedule = &self.args.schedule;
        let parent = self.last.as_ref().filter(|d| {
            !at.full
                && d.deltas_since_full < schedule.full_every
                && d.chain_bytes < chain_bound(schedule.keep_bytes, d.full_bytes)
        });
        let Some(last) = parent else {
            let mut snaps = Vec::with_capacity(shards.len());
            for h in shards {
                snaps.push(h.snapshot().await?);
            }
            return Ok(Payload::Full(snaps));
        };
        let mut deltas = Vec::with_capacity(shards.len());
        for (h, since) in shards.iter().zip(&last.tables) {
            deltas.push(h.delta_since(since.clone()).await?);
        }
        Ok(Payload::Delta {
            parent: last.version,
            shards: deltas,
        })
    }

    /// Writes a captured version; on success, moves the durable point and lets the shards
    /// drop the history it covers. `life` is the context of the version's capture: the write
    /// is its child, and subscribers get it with the manifest.
    async fn write(&mut self, at: StepBoundary, payload: Payload, life: &TraceContext) {
        let full = matches!(payload, Payload::Full(_));
        let span = telemetry::received(life, || {
            tracing::info_span!(target: telemetry::TARGET, "version.write",
                freshet.kind = if full { "full" } else { "delta" }, freshet.step = at.meta.step as i64,
                freshet.version = tracing::field::Empty, freshet.bytes = tracing::field::Empty)
        });
        let tables = payload.table_versions();
        let store = self.args.store.clone();
        let started = Instant::now();
        let dense = Arc::new(at.dense);
        let parent = self.last.as_ref().map(|d| (d.version, d.dense.clone()));
        let d = dense.clone();
        let mut meta = at.meta;
        if meta.placement.is_none() {
            meta.placement = self.args.shards.placement().cloned();
        }
        let written = tokio::task::spawn_blocking(move || {
            let parent = parent.as_ref().map(|(v, d)| (*v, &**d));
            store.write_after(meta, &d, &payload, parent)
        })
        .await;
        let manifest = match written {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                telemetry::set_attribute(&span, "error.type", "write_failed");
                tracing::error!(error = %e, "checkpoint write failed; the next version is a delta from the last durable one");
                self.stats.write_failures += 1;
                self.stats.last_error = Some(e.to_string());
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoint write task failed");
                self.stats.write_failures += 1;
                self.stats.last_error = Some(e.to_string());
                return;
            }
        };
        span.record("freshet.version", manifest.version as i64);
        span.record("freshet.bytes", manifest.bytes() as i64);
        self.stats.last_write_ms = started.elapsed().as_secs_f64() * 1e3;
        self.stats.bytes_written += manifest.bytes();
        self.stats.last_version = Some(manifest.version);
        if full {
            self.stats.full_written += 1;
        } else {
            self.stats.deltas_written += 1;
        }
        let (deltas_since_full, chain_bytes, full_bytes) =
            match self.last.as_ref().filter(|_| !full) {
                None => (0, manifest.bytes(), manifest.bytes()),
                Some(d) => (
                    d.deltas_since_full + 1,
                    d.chain_bytes + manifest.bytes(),
                    d.full_bytes,
                ),
            };
        if full {
            if let Some(keep) = self.args.schedule.keep_bytes {
                let over = 4 * full_bytes > keep;
                if over && !self.stats.store_over_bound {
                    tracing::warn!(
                        full_version_bytes = full_bytes,
                        keep_bytes = keep,
                        "a full version takes more than a quarter of checkpoint.keep_bytes, so \
                         the store cannot keep two chains within it: chains grow to twice their \
                         full version and the store goes past the bound; raise keep_bytes, or \
                         bound the tables (embedding eviction.capacity)"
                    );
                }
                self.stats.store_over_bound = over;
            }
        }
        for (h, through) in self.args.shards.shards().iter().zip(&tables) {
            // Failing to forget only costs memory; the next delta is still correct.
            if let Err(e) = h.forget_changes_through(through.clone()).await {
                tracing::warn!(error = %e, "a shard could not drop checkpointed change history");
            }
        }
        self.last = Some(Durable {
            version: manifest.version,
            tables,
            deltas_since_full,
            chain_bytes,
            full_bytes,
            dense,
        });
        let schedule = &self.args.schedule;
        match self
            .args
            .store
            .retain_within(schedule.keep_full, schedule.keep_bytes)
        {
            Ok(deleted) => self.stats.versions_deleted += deleted.len() as u64,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint retention failed; will retry after the next version")
            }
        }
        self.kept_offsets
            .insert(manifest.version, manifest.sample_offsets.clone());
        if let Err(e) = self.hold_samples() {
            // The hold stays where it was, lower: the log keeps more, never less.
            tracing::warn!(
                error = format!("{e:#}"),
                "moving the model store's hold on the sample log failed"
            );
        }
        drop(span);
        self.subscribers.retain(|tx| {
            tx.send(Envelope::with_trace(life.clone(), manifest.clone()))
                .is_ok()
        });
    }

    /// Holds the sample log from the lowest offset of any kept version, per partition.
    fn hold_samples(&mut self) -> anyhow::Result<()> {
        let Some(log) = self.args.samples.clone() else {
            return Ok(());
        };
        let kept = self.args.store.versions()?;
        self.kept_offsets
            .retain(|v, _| kept.binary_search(v).is_ok());
        for &v in &kept {
            if !self.kept_offsets.contains_key(&v) {
                let m = self
                    .args
                    .store
                    .manifest(v)
                    .with_context(|| format!("reading the sample offsets of version {v}"))?;
                self.kept_offsets.insert(v, m.sample_offsets);
            }
        }
        for p in 0..log.partitions() {
            // A version that names no offset for a partition had read nothing of it, and an
            // empty store trains from the start of the log.
            let floor = self
                .kept_offsets
                .values()
                .map(|o| o.get(&p).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            log.hold(RETENTION_HOLDER, p, floor)?;
        }
        Ok(())
    }
}

impl Actor for CheckpointWriter {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: WriterArgs,
    ) -> Result<WriterState, ActorProcessingErr> {
        // This writer is the store's only one: anything half-written was left by a crash.
        let stale = args.store.remove_stale_temporaries()?;
        if stale > 0 {
            tracing::info!(
                stale,
                "removed checkpoint directories left by an interrupted write"
            );
        }
        let mut st = WriterState {
            args,
            last: None,
            subscribers: Vec::new(),
            stats: WriterStats::default(),
            kept_offsets: BTreeMap::new(),
        };
        // Before the first version: the trainer is restoring from what the store holds now,
        // and a hold file left by a crash may name versions that are gone.
        if let Err(e) = st.hold_samples() {
            tracing::warn!(
                error = format!("{e:#}"),
                "holding the sample log for the model store's versions failed"
            );
        }
        Ok(st)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: WriterMsg,
        st: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg.body {
            WriterRequest::Capture { at, reply } => {
                st.stats.captures += 1;
                // A version's life is one trace, from this capture to the replicas serving it.
                let life = if telemetry::enabled() {
                    tracing::info_span!(target: telemetry::TARGET, "version.capture",
                        freshet.step = at.meta.step as i64,
                        freshet.rows_trained = at.meta.rows_trained as i64)
                } else {
                    tracing::Span::none()
                };
                telemetry::continue_from(&life, &msg.trace);
                match st.capture(&at).await {
                    Ok(payload) => {
                        // The trainer may go on: the rows are captured.
                        let _ = reply.send(Ok(()));
                        let life = {
                            let cx = telemetry::context_of(&life);
                            drop(life);
                            cx
                        };
                        st.args.faults.check("writer.write");
                        st.write(*at, payload, &life).await;
                    }
                    Err(e) => {
                        telemetry::set_attribute(&life, "error.type", "capture_failed");
                        let _ = reply.send(Err(CaptureError::from(&e)));
                    }
                }
            }
            WriterRequest::Subscribe { tx } => st.subscribers.push(tx),
            WriterRequest::Flush { reply } => {
                let _ = reply.send(st.stats.clone());
            }
            WriterRequest::Reset { reply } => {
                st.last = None;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

/// A typed handle to the CheckpointWriter, with the schedule the trainer consults.
#[derive(Debug, Clone)]
pub struct CheckpointHandle {
    actor: ActorRef<WriterMsg>,
    due: Arc<Mutex<Due>>,
    demanded: Arc<AtomicBool>,
}

impl CheckpointHandle {
    pub async fn spawn(
        args: WriterArgs,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        Self::start(args, None).await
    }

    /// Starts the writer linked to a supervisor.
    pub async fn spawn_linked(
        args: WriterArgs,
        supervisor: ractor::ActorCell,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        Self::start(args, Some(supervisor)).await
    }

    async fn start(
        args: WriterArgs,
        supervisor: Option<ractor::ActorCell>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        let due = Due {
            schedule: args.schedule.clone(),
            last_step: 0,
            last_at: Instant::now(),
        };
        let (actor, join) = match supervisor {
            Some(s) => Actor::spawn_linked(None, CheckpointWriter, args, s).await?,
            None => Actor::spawn(None, CheckpointWriter, args).await?,
        };
        Ok((
            Self {
                actor,
                due: Arc::new(Mutex::new(due)),
                demanded: Arc::new(AtomicBool::new(false)),
            },
            join,
        ))
    }

    pub fn cell(&self) -> ractor::ActorCell {
        self.actor.get_cell()
    }

    pub fn due(&self, step: u64) -> bool {
        if self.demanded.load(Ordering::Relaxed) {
            return true;
        }
        self.due
            .lock()
            .map(|d| d.due(step, Instant::now()))
            .unwrap_or(true)
    }

    /// Asks for a version at the next step boundary.
    pub fn demand(&self) {
        self.demanded.store(true, Ordering::Relaxed);
    }

    /// Captures a version at this step boundary. Returns once the shards have handed over
    /// their rows; the write continues in the writer.
    pub async fn capture(&self, at: StepBoundary) -> Result<(), WriterError> {
        let step = at.meta.step;
        let r = self
            .actor
            .call(
                |reply| {
                    Envelope::new(WriterRequest::Capture {
                        at: Box::new(at),
                        reply,
                    })
                },
                None,
            )
            .await;
        let r = match r {
            Ok(CallResult::Success(Ok(()))) => Ok(()),
            Ok(CallResult::Success(Err(e))) => Err(WriterError::Capture(e)),
            Ok(_) => Err(WriterError::Unavailable("stopped before replying".into())),
            Err(e) => Err(WriterError::Unavailable(e.to_string())),
        };
        if r.is_ok() {
            self.demanded.store(false, Ordering::Relaxed);
            if let Ok(mut d) = self.due.lock() {
                d.last_step = step;
                d.last_at = Instant::now();
            }
        }
        r
    }

    /// New versions' manifests, as they are written, each in the envelope of its version's
    /// trace.
    pub fn subscribe(&self) -> Result<mpsc::UnboundedReceiver<Envelope<Manifest>>, WriterError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.actor
            .send_message(Envelope::new(WriterRequest::Subscribe { tx }))
            .map_err(|e| WriterError::Unavailable(e.to_string()))?;
        Ok(rx)
    }

    /// Waits until every capture sent so far is written, and returns the counters.
    pub async fn flush(&self) -> Result<WriterStats, WriterError> {
        match self
            .actor
            .call(|reply| Envelope::new(WriterRequest::Flush { reply }), None)
            .await
        {
            Ok(CallResult::Success(s)) => Ok(s),
            Ok(_) => Err(WriterError::Unavailable("stopped before replying".into())),
            Err(e) => Err(WriterError::Unavailable(e.to_string())),
        }
    }

    /// Makes the next version full: the shards were restored to a state the last version's
    /// table versions do not describe.
    pub async fn reset(&self) -> Result<(), WriterError> {
        match self
            .actor
            .call(|reply| Envelope::new(WriterRequest::Reset { reply }), None)
            .await
        {
            Ok(CallResult::Success(())) => Ok(()),
            Ok(_) => Err(WriterError::Unavailable("stopped before replying".into())),
            Err(e) => Err(WriterError::Unavailable(e.to_string())),
        }
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
