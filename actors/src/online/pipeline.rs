//! One node's pipeline under one supervisor, and the commands that move it in time.
//!
//! Children, in start order, with their strategies:
//!
//! | child | strategy | why |
//! |---|---|---|
//! | `replica-i` | one-for-one | holds only a model cell that survives it |
//! | `joiner-p` | one-for-one | restarts from its own checkpoint, exactly once |
//! | `shard-i` | rest-for-one | the writer, trainer and validator hold its handle |
//! | `writer` | rest-for-one | its delta base describes the shards' current state |
//! | `trainer` | rest-for-one | restores every shard from a version when it starts |
//! | `validator` | rest-for-one | follows the writer's versions |
//!
//! Whatever fails among the shards, the writer and the trainer, a new trainer starts: it
//! restores all shards and the dense net to the newest live version and consumes the sample
//! log from that version's offsets. So no sample is lost or applied twice.
//!
//! **Commands** restart the training group (`writer` and after) with a new plan:
//! - rollback to `v`: the replicas switch to `v` first; the trainer's start marks every later
//!   version as rolled back, so the newest live version is `v`;
//! - replay `[a, b)` (minus a skip): the trainer runs the replay before live samples, and the
//!   next version records it; a trainer restarted before that version replays it again from
//!   the same starting version, so it is applied once;
//! - calibration from a base store: the trainer's start installs the base model as a new
//!   version (with the base's sample-log offsets), then resumes from it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::Serialize;
use thiserror::Error;

use super::gate::GateConfig;
use super::validator::{RollbackFn, ValidatorArgs, ValidatorHandle, ValidatorStatus};
use crate::ckpt::writer::{CheckpointHandle, Schedule, WriterArgs};
use crate::ckpt::{CalibrationSource, ModelStore, Payload, RolledBack, VersionMeta};
use crate::dense::Threads;
use crate::fault::Faults;
use crate::ids::TableName;
use crate::joiner::{CheckpointEvery, JoinArgs, JoinConfig, JoinerHandle, JoinerStats};
use crate::serving::replica::{ReplicaArgs, ReplicaHandle, ReplicaStatus};
use crate::serving::ModelCell;
use crate::serving::ReplicaSet;
use crate::shard::{ShardArgs, ShardHandle, ShardPlacer, ShardRouter};
use crate::stream::StreamLog;
use crate::supervisor::{
    ChildSpec, ChildStatus, Intensity, RestartError, StartFn, Strategy, SupervisorArgs,
    SupervisorHandle,
};
use crate::telemetry;
use crate::training::feed::{ReplayError, ReplayPlan};
use crate::training::{FreshModel, TrainStart, TrainerActorHandle, TrainerArgs, TrainerStatus};

/// The logs a pipeline reads and writes.
#[derive(Clone, Debug)]
pub struct Logs {
    pub events: Arc<dyn StreamLog>,
    pub samples: Arc<dyn StreamLog>,
    pub dead_letters: Arc<dyn StreamLog>,
    pub sample_rejects: Arc<dyn StreamLog>,
}

/// Everything a pipeline is built from.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub logs: Logs,
    pub store: ModelStore,
    /// Where the joiners keep their checkpoints.
    pub joiner_dir: PathBuf,
    pub join: JoinConfig,
    pub joiner_checkpoint: CheckpointEvery,
    pub joiner_batch: usize,
    pub fresh: FreshModel,
    pub shards: u32,
    /// Where the shard owners run: `None` in this process, else on the nodes the placer
    /// picks; each `shard-i` child is then the owner's stand-in here.
    pub placer: Option<Arc<dyn ShardPlacer>>,
    pub spill_dir: Option<PathBuf>,
    pub schedule: Schedule,
    pub batch: usize,
    pub threads: usize,
    pub gate: GateConfig,
    pub replicas: usize,
    pub intensity: Intensity,
    pub faults: Faults,
}

/// What a command could not do. Callers (the admin API) answer each case differently.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The pipeline restarts only children it built, by their own names: a restart that fails is
/// the node's failure, never the caller's.
impl From<RestartError> for CommandError {
    fn from(e: RestartError) -> Self {
        Self::Failed(anyhow::Error::new(e))
    }
}

/// The node at a glance.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineStatus {
    pub children: Vec<ChildStatus>,
    pub trainer: Option<TrainerStatus>,
    pub validator: Option<ValidatorStatus>,
    pub replicas: Vec<ReplicaStatus>,
    pub joiners: Vec<JoinerStats>,
    /// The newest version and the newest one not rolled back.
    pub latest_version: Option<u64>,
    pub latest_live_version: Option<u64>,
}

#[derive(Debug, Default)]
struct Plan {
    rollback_to: Option<u64>,
    /// The replay, and (once a trainer got it) the version that trainer started from.
    replay: Option<(ReplayPlan, Option<Option<u64>>)>,
    calibrate: Option<CalibrationSource>,
}

#[derive(Debug, Default)]
struct Registry {
    joiners: Vec<Option<JoinerHandle>>,
    shards: Vec<Option<ShardHandle>>,
    writer: Option<CheckpointHandle>,
    trainer: Option<TrainerActorHandle>,
    validator: Option<ValidatorHandle>,
}

#[derive(Debug)]
struct Ctx {
    cfg: PipelineConfig,
    threads: Arc<Threads>,
    cells: Vec<Arc<ModelCell>>,
    replicas: ReplicaSet,
    reg: Mutex<Registry>,
    plan: Mutex<Plan>,
    /// The supervisor, for the validator's automatic rollback.
    sup: Mutex<Option<SupervisorHandle>>,
    /// Why the supervisor gave up, once it has.
    gave_up: Arc<std::sync::OnceLock<String>>,
}

impl Ctx {
    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The newest version that passed validation and is not rolled back: what serving should
/// show after a restart.
pub fn latest_servable(store: &ModelStore) -> anyhow::Result<Option<u64>> {
    for v in store.versions()?.into_iter().rev() {
        let m = store.manifest(v)?;
        if m.rolled_back.is_none() && m.validation.as_ref().is_some_and(|x| x.passed) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn start_fn<F, Fut>(ctx: &Arc<Ctx>, f: F) -> StartFn
where
    F: Fn(Arc<Ctx>, ractor::ActorCell) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<ractor::ActorCell>> + Send + 'static,
{
    let ctx = ctx.clone();
    let f = Arc::new(f);
    Arc::new(move |sup| {
        let (ctx, f) = (ctx.clone(), f.clone());
        Box::pin(async move { f(ctx, sup).await })
    })
}

async fn start_replica(
    ctx: Arc<Ctx>,
    sup: ractor::ActorCell,
    i: usize,
) -> anyhow::Result<ractor::ActorCell> {
    let h = ReplicaHandle::spawn_linked(
        ReplicaArgs {
            name: format!("replica-{i}"),
            store: ctx.cfg.store.clone(),
            cell: ctx.cells[i].clone(),
            faults: ctx.cfg.faults.clone(),
        },
        sup,
    )
    .await?;
    // A replica (re)starting serves what the node last decided to serve.
    let store = ctx.cfg.store.clone();
    let servable = tokio::task::spawn_blocking(move || latest_servable(&store)).await??;
    if let Some(v) = servable.filter(|&v| ctx.cells[i].version() != Some(v)) {
        h.publish(v)?;
    }
    ctx.replicas.set(i, h.clone());
    Ok(h.actor_cell())
}

async fn start_joiner(
    ctx: Arc<Ctx>,
    sup: ractor::ActorCell,
    p: u32,
) -> anyhow::Result<ractor::ActorCell> {
    let c = &ctx.cfg;
    let h = JoinerHandle::spawn_linked(
        JoinArgs {
            partition: p,
            events: c.logs.events.clone(),
            samples: c.logs.samples.clone(),
            dead_letters: c.logs.dead_letters.clone(),
            checkpoint_dir: c.joiner_dir.clone(),
            config: c.join.clone(),
            checkpoint_every: c.joiner_checkpoint,
            group: "joiner".into(),
            batch: c.joiner_batch,
            faults: c.faults.clone(),
        },
        sup,
    )
    .await?;
    let cell = h.cell();
    ctx.reg().joiners[p as usize] = Some(h);
    Ok(cell)
}

async fn start_shard(
    ctx: Arc<Ctx>,
    sup: ractor::ActorCell,
    i: u32,
) -> anyhow::Result<ractor::ActorCell> {
    let c = &ctx.cfg;
    let tables: Vec<(TableName, _)> = c
        .fresh
        .tables
        .iter()
        .map(|(n, t)| (TableName::new(n), t.clone()))
        .collect();
    if let Some(placer) = &c.placer {
        let h = placer
            .place_shard(i, c.shards, tables, sup)
            .await
            .with_context(|| format!("placing shard {i}"))?;
        let cell = h.actor().get_cell();
        ctx.reg().shards[i as usize] = Some(h);
        return Ok(cell);
    }
    let h = ShardHandle::spawn_linked(
        ShardArgs {
            shard: i,
            shard_count: c.shards,
            tables,
            spill_dir: c.spill_dir.as_ref().map(|d| d.join(format!("shard-{i}"))),
            restore: None,
            faults: c.faults.clone(),
        },
        sup,
    )
    .await?;
    let cell = h.actor().get_cell();
    ctx.reg().shards[i as usize] = Some(h);
    Ok(cell)
}

fn router(ctx: &Ctx) -> anyhow::Result<ShardRouter> {
    let reg = ctx.reg();
    let shards: Option<Vec<ShardHandle>> = reg.shards.iter().cloned().collect();
    let router = ShardRouter::new(shards.context("a shard is not running")?);
    // The versions record where their shards were.
    Ok(match ctx.cfg.placer.as_ref().and_then(|p| p.placement()) {
        Some(placement) => router.with_placement(placement),
        None => router,
    })
}

async fn start_writer(ctx: Arc<Ctx>, sup: ractor::ActorCell) -> anyhow::Result<ractor::ActorCell> {
    let (h, _join) = CheckpointHandle::spawn_linked(
        WriterArgs {
            store: ctx.cfg.store.clone(),
            shards: router(&ctx)?,
            schedule: ctx.cfg.schedule.clone(),
            samples: Some(ctx.cfg.logs.samples.clone()),
            faults: ctx.cfg.faults.clone(),
        },
        sup,
    )
    .await?;
    let cell = h.cell();
    ctx.reg().writer = Some(h);
    Ok(cell)
}

/// Carries out the plan's pending store changes, then returns where the trainer starts.
/// Runs while no trainer runs and the writer has nothing to write, so the store has no other
/// writer meanwhile.
fn prepare_start(ctx: &Ctx) -> anyhow::Result<TrainStart> {
    let store = &ctx.cfg.store;
    set_aside_unreadable(store)?;
    let mut plan = ctx.plan();
    if let Some(to) = plan.rollback_to.take() {
        let at_unix_ms = now_unix_ms();
        for v in store.versions()?.into_iter().filter(|&v| v > to) {
            if store.manifest(v)?.rolled_back.is_none() {
                store.set_rolled_back(v, RolledBack { to, at_unix_ms })?;
            }
        }
    }
    if let Some(src) = plan.calibrate.take() {
        let v = install_base(ctx, &src)?;
        tracing::info!(version = v, base = %src.store.display(), base_version = src.version, "calibration installed the base model");
    }
    let version = store.latest_live()?;
    let replay = match plan.replay.take() {
        None => None,
        Some((r, None)) => {
            plan.replay = Some((r.clone(), Some(version)));
            Some(r)
        }
        Some((r, Some(from))) => {
            if recorded_after(store, from, &r)? {
                None
            } else {
                // The trainer that ran it died before a version recorded it; it resumes from
                // the same version, so the replay runs again from its start.
                plan.replay = Some((r.clone(), Some(from)));
                Some(r)
            }
        }
    };
    Ok(TrainStart { version, replay })
}

/// Sets aside (in the store's `quarantine/`) every version whose manifest does not read, and
/// says so: nothing could tell what such a version holds, so no actor may start from it.
fn set_aside_unreadable(store: &ModelStore) -> anyhow::Result<()> {
    let set_aside = store
        .set_aside_unreadable()
        .context("setting aside versions whose manifest does not read")?;
    for (v, e) in set_aside {
        tracing::error!(version = v, error = %e, "a version's manifest does not read: set aside in the store's quarantine/");
    }
    Ok(())
}

/// Whether a live version newer than `from` records the replay `r`.
fn recorded_after(store: &ModelStore, from: Option<u64>, r: &ReplayPlan) -> anyhow::Result<bool> {
    for v in store.versions()? {
        if from.is_some_and(|f| v <= f) {
            continue;
        }
        let m = store.manifest(v)?;
        let same = |x: &crate::ckpt::ReplayRecord| {
            (x.partition, x.from, x.to, x.skip) == (r.partition, r.from, r.to, r.skip)
        };
        if m.rolled_back.is_none() && m.replays.iter().any(same) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes the base model of `src` into the store as a new full version.
fn install_base(ctx: &Ctx, src: &CalibrationSource) -> anyhow::Result<u64> {
    let base = ModelStore::open_existing(&src.store)
        .with_context(|| format!("opening the base store {}", src.store.display()))?;
    let r = base
        .restore(src.version, Some(ctx.cfg.shards))
        .with_context(|| format!("restoring version {} of the base", src.version))?;
    let m = &r.manifest;
    let meta = VersionMeta {
        step: m.step,
        rows_trained: m.rows_trained,
        samples_rejected: m.samples_rejected,
        replays: Vec::new(),
        calibrated_from: Some(src.clone()),
        sample_offsets: m.sample_offsets.clone(),
        joiner_offsets: m.joiner_offsets.clone(),
        model: m.model.clone(),
        schema: m.schema.clone(),
        tables: m.tables.clone(),
        placement: None,
    };
    let written = ctx
        .cfg
        .store
        .write(meta, &r.dense, &Payload::Full(r.shards))
        .context("writing the base model into the store")?;
    Ok(written.version)
}

async fn start_trainer(ctx: Arc<Ctx>, sup: ractor::ActorCell) -> anyhow::Result<ractor::ActorCell> {
    let c2 = ctx.clone();
    let start = tokio::task::spawn_blocking(move || prepare_start(&c2)).await??;
    let writer = ctx
        .reg()
        .writer
        .clone()
        .context("the writer is not running")?;
    let c = &ctx.cfg;
    let h = TrainerActorHandle::spawn_linked(
        TrainerArgs {
            store: c.store.clone(),
            samples: c.logs.samples.clone(),
            rejects: c.logs.sample_rejects.clone(),
            shards: router(&ctx)?,
            writer,
            start,
            fresh: c.fresh.clone(),
            batch: c.batch,
            threads: ctx.threads.clone(),
            faults: c.faults.clone(),
        },
        sup,
    )
    .await?;
    let cell = h.cell();
    ctx.reg().trainer = Some(h);
    Ok(cell)
}

async fn start_validator(
    ctx: Arc<Ctx>,
    sup: ractor::ActorCell,
) -> anyhow::Result<ractor::ActorCell> {
    let writer = ctx
        .reg()
        .writer
        .clone()
        .context("the writer is not running")?;
    let weak = Arc::downgrade(&ctx);
    let rollback: RollbackFn = Arc::new(move |v| {
        if let Some(ctx) = weak.upgrade() {
            // Not awaited: the rollback restarts the validator that asked for it.
            tokio::spawn(async move {
                if let Err(e) = rollback(&ctx, v).await {
                    tracing::error!(to = v, error = %e, "automatic rollback failed");
                }
            });
        }
    });
    let c = &ctx.cfg;
    let h = ValidatorHandle::spawn_linked(
        ValidatorArgs {
            store: c.store.clone(),
            samples: c.logs.samples.clone(),
            writer,
            replicas: ctx.replicas.clone(),
            gate: c.gate.clone(),
            threads: ctx.threads.clone(),
            rollback: Some(rollback),
            faults: c.faults.clone(),
        },
        sup,
    )
    .await?;
    let cell = h.cell();
    ctx.reg().validator = Some(h);
    Ok(cell)
}

async fn rollback(ctx: &Ctx, v: u64) -> Result<(), CommandError> {
    let store = &ctx.cfg.store;
    let m = store
        .manifest(v)
        .map_err(|e| CommandError::NotFound(format!("version {v}: {e}")))?;
    if let Some(rb) = &m.rolled_back {
        return Err(CommandError::Conflict(format!(
            "version {v} is history since a rollback to {}",
            rb.to
        )));
    }
    if let Some(val) = m.validation.as_ref().filter(|x| !x.passed) {
        return Err(CommandError::Conflict(format!(
            "version {v} failed validation ({}); rolling back to it would serve it",
            val.reason.as_deref().unwrap_or("no reason recorded")
        )));
    }
    store
        .chain(v)
        .map_err(|e| CommandError::Conflict(format!("version {v} cannot be restored: {e}")))?;
    let span = if telemetry::enabled() {
        tracing::info_span!(target: telemetry::TARGET, "supervision.rollback",
            freshet.version = v as i64, freshet.step = m.step as i64,
            freshet.sample_offsets = ?m.sample_offsets)
    } else {
        tracing::Span::none()
    };
    // Serving first: it switches at once, before training rewinds.
    for err in ctx
        .replicas
        .publish_traced(v, &telemetry::context_of(&span))
    {
        tracing::warn!(version = v, error = %err, "a replica missed the rollback");
    }
    // A replica answers its status after the publish before it in its mailbox: once each has
    // answered, each serves `v` (or failed to, and says why), so the command's answer, and a
    // caller reading the served version after it, see the rollback done.
    for h in ctx.replicas.handles() {
        match h.status().await {
            Ok(st) if st.version != Some(v) => {
                tracing::warn!(version = v, serving = ?st.version, error = ?st.last_error,
                    "a replica does not serve the rollback's version");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(version = v, error = %e, "a replica did not answer after the rollback")
            }
        }
    }
    ctx.plan().rollback_to = Some(v);
    let sup = ctx
        .sup
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .context("the supervisor is not running")?;
    sup.restart_from("writer").await?;
    Ok(())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The running pipeline.
#[derive(Clone, Debug)]
pub struct PipelineHandle {
    ctx: Arc<Ctx>,
    sup: SupervisorHandle,
}

impl PipelineHandle {
    /// Starts every child in order; fails if one cannot start.
    pub async fn start(cfg: PipelineConfig) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        anyhow::ensure!(cfg.shards > 0, "a pipeline needs at least one shard");
        anyhow::ensure!(
            cfg.replicas > 0,
            "a pipeline needs at least one serving replica"
        );
        let partitions = cfg.logs.events.partitions();
        anyhow::ensure!(
            cfg.logs.samples.partitions() == partitions
                && cfg.logs.dead_letters.partitions() == partitions,
            "the event, sample and dead-letter topics must have the same partitions"
        );
        // Before any actor reads the store: a replica looks for what to serve, the trainer
        // for where to resume.
        let store = cfg.store.clone();
        tokio::task::spawn_blocking(move || set_aside_unreadable(&store))
            .await
            .context("quarantine task")??;
        let ctx = Arc::new(Ctx {
            threads: Arc::new(Threads::new(cfg.threads)?),
            cells: (0..cfg.replicas)
                .map(|_| Arc::new(ModelCell::new()))
                .collect(),
            replicas: ReplicaSet::with_len(cfg.replicas),
            reg: Mutex::new(Registry {
                joiners: vec![None; partitions as usize],
                shards: vec![None; cfg.shards as usize],
                ..Registry::default()
            }),
            plan: Mutex::new(Plan::default()),
            sup: Mutex::new(None),
            gave_up: Arc::default(),
            cfg,
        });
        let mut children = Vec::new();
        for i in 0..ctx.cfg.replicas {
            children.push(ChildSpec {
                name: format!("replica-{i}"),
                strategy: Strategy::OneForOne,
                start: start_fn(&ctx, move |c, s| start_replica(c, s, i)),
            });
        }
        for p in 0..partitions {
            children.push(ChildSpec {
                name: format!("joiner-{p}"),
                strategy: Strategy::OneForOne,
                start: start_fn(&ctx, move |c, s| start_joiner(c, s, p)),
            });
        }
        for i in 0..ctx.cfg.shards {
            children.push(ChildSpec {
                name: format!("shard-{i}"),
                strategy: Strategy::RestForOne,
                start: start_fn(&ctx, move |c, s| start_shard(c, s, i)),
            });
        }
        children.push(ChildSpec {
            name: "writer".into(),
            strategy: Strategy::RestForOne,
            start: start_fn(&ctx, start_writer),
        });
        children.push(ChildSpec {
            name: "trainer".into(),
            strategy: Strategy::RestForOne,
            start: start_fn(&ctx, start_trainer),
        });
        children.push(ChildSpec {
            name: "validator".into(),
            strategy: Strategy::RestForOne,
            start: start_fn(&ctx, start_validator),
        });
        let (sup, join) = SupervisorHandle::spawn(SupervisorArgs {
            name: "node".into(),
            children,
            intensity: ctx.cfg.intensity,
            gave_up: ctx.gave_up.clone(),
        })
        .await?;
        *ctx.sup.lock().unwrap_or_else(|p| p.into_inner()) = Some(sup.clone());
        Ok((Self { ctx, sup }, join))
    }

    pub fn store(&self) -> &ModelStore {
        &self.ctx.cfg.store
    }

    pub fn shard_count(&self) -> u32 {
        self.ctx.cfg.shards
    }

    /// Why the supervisor gave up (restarts beyond its intensity), once it has: the node then
    /// trains no more, and its replicas' cells keep the last version they served.
    pub fn gave_up(&self) -> Option<&str> {
        self.ctx.gave_up.get().map(String::as_str)
    }

    /// Where [`Self::gave_up`]'s reason is set, for holders that outlive a borrow (the HTTP
    /// state).
    pub fn gave_up_slot(&self) -> Arc<std::sync::OnceLock<String>> {
        self.ctx.gave_up.clone()
    }

    pub fn logs(&self) -> &Logs {
        &self.ctx.cfg.logs
    }

    pub fn faults(&self) -> &Faults {
        &self.ctx.cfg.faults
    }

    /// The model cells the replicas serve from (request handlers read these directly).
    pub fn cells(&self) -> &[Arc<ModelCell>] {
        &self.ctx.cells
    }

    pub fn replicas(&self) -> &ReplicaSet {
        &self.ctx.replicas
    }

    pub async fn supervisor_status(&self) -> anyhow::Result<Vec<ChildStatus>> {
        self.sup.status().await
    }

    pub fn threads(&self) -> &Arc<Threads> {
        &self.ctx.threads
    }

    pub fn gate(&self) -> &GateConfig {
        &self.ctx.cfg.gate
    }

    pub async fn trainer_status(&self) -> anyhow::Result<TrainerStatus> {
        let t = self.ctx.reg().trainer.clone().context("no trainer")?;
        t.status().await
    }

    pub async fn validator_status(&self) -> anyhow::Result<ValidatorStatus> {
        let v = self.ctx.reg().validator.clone().context("no validator")?;
        v.status().await
    }

    pub async fn status(&self) -> anyhow::Result<PipelineStatus> {
        let mut children = self.sup.status().await?;
        if let Some(placer) = &self.ctx.cfg.placer {
            let (here, placement) = (placer.local_node(), placer.placement());
            for c in &mut children {
                let shard = c
                    .name
                    .strip_prefix("shard-")
                    .and_then(|i| i.parse::<usize>().ok());
                c.node = match (shard, &placement) {
                    (Some(i), Some(p)) => p.nodes.get(i).cloned(),
                    _ => Some(here.clone()),
                };
            }
        }
        let (joiners, trainer, validator) = {
            let reg = self.ctx.reg();
            (
                reg.joiners.clone(),
                reg.trainer.clone(),
                reg.validator.clone(),
            )
        };
        let mut js = Vec::new();
        for j in joiners.into_iter().flatten() {
            if let Ok(s) = j.stats().await {
                js.push(s);
            }
        }
        let mut replicas = Vec::new();
        for r in self.ctx.replicas.handles() {
            if let Ok(s) = r.status().await {
                replicas.push(s);
            }
        }
        let trainer = match trainer {
            Some(t) => t.status().await.ok(),
            None => None,
        };
        let validator = match validator {
            Some(v) => v.status().await.ok(),
            None => None,
        };
        let store = self.ctx.cfg.store.clone();
        let (latest, live) = tokio::task::spawn_blocking(move || {
            Ok::<_, anyhow::Error>((store.latest()?, store.latest_live()?))
        })
        .await??;
        Ok(PipelineStatus {
            children,
            trainer,
            validator,
            replicas,
            joiners: js,
            latest_version: latest,
            latest_live_version: live,
        })
    }

    /// Serving switches to `v` at once; the trainer and shards restore `v` and consume the
    /// samples after its offsets; later versions are kept, marked as rolled back.
    pub async fn rollback(&self, v: u64) -> Result<(), CommandError> {
        rollback(&self.ctx, v).await
    }

    /// The failover after a node hosting shards is lost (`why`): every shard is placed again
    /// on the nodes reachable now, at a new placement epoch, and the trainer restores all of
    /// them and the dense net to the newest live version and resumes from its offsets, as a
    /// restart in one process does. Restarts `shard-0` and every child after it; returns once
    /// the trainer runs again. Like the other commands it does not count against the
    /// supervisor's intensity: a lost node is not a fault of the children.
    pub async fn fail_over(&self, why: &str) -> Result<(), CommandError> {
        if self.ctx.cfg.placer.is_none() {
            return Err(CommandError::Invalid(
                "this node's shards run in its own process: there is nothing to fail over".into(),
            ));
        }
        let _span = if telemetry::enabled() {
            tracing::info_span!(target: telemetry::TARGET, "supervision.failover",
                freshet.reason = %why)
        } else {
            tracing::Span::none()
        };
        self.sup.restart_from("shard-0").await?;
        Ok(())
    }

    /// Asks for a version at the trainer's next step boundary and waits up to `within` for
    /// it; the new version, or none when none came (a trainer with nothing new to write).
    pub async fn capture_now(&self, within: std::time::Duration) -> anyhow::Result<Option<u64>> {
        let latest = |store: ModelStore| async move {
            tokio::task::spawn_blocking(move || store.latest())
                .await
                .context("store task")?
                .context("reading the store")
        };
        let before = latest(self.ctx.cfg.store.clone()).await?;
        let writer = self
            .ctx
            .reg()
            .writer
            .clone()
            .context("the writer is not running")?;
        writer.demand();
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let now = latest(self.ctx.cfg.store.clone()).await?;
            if now > before {
                return Ok(now);
            }
        }
        Ok(None)
    }

    /// Re-consumes `plan` before live samples; the next version records it.
    pub async fn replay(&self, plan: ReplayPlan) -> Result<(), CommandError> {
        let _span = if telemetry::enabled() {
            tracing::info_span!(target: telemetry::TARGET, "supervision.replay",
                freshet.partition = plan.partition as i64, freshet.from = plan.from as i64,
                freshet.to = plan.to as i64, freshet.skip = ?plan.skip)
        } else {
            tracing::Span::none()
        };
        plan.check(&*self.ctx.cfg.logs.samples)
            .map_err(|e| match e {
                ReplayError::Log(e) => CommandError::Failed(
                    anyhow::Error::new(e).context("replay: reading the sample log"),
                ),
                e => CommandError::Invalid(format!("replay: {e}")),
            })?;
        {
            let mut p = self.ctx.plan();
            if let Some((r, from)) = &p.replay {
                let finished = match from {
                    Some(f) => recorded_after(&self.ctx.cfg.store, *f, r)?,
                    None => false,
                };
                if !finished {
                    return Err(CommandError::Conflict(format!(
                        "a replay of partition {} [{}, {}) is still running",
                        r.partition, r.from, r.to
                    )));
                }
            }
            p.replay = Some((plan, None));
        }
        self.sup.restart_from("writer").await?;
        Ok(())
    }

    /// Installs version `version` (default: newest) of the base store as the online model,
    /// and resumes training from its sample-log offsets.
    pub async fn calibrate(
        &self,
        base: PathBuf,
        version: Option<u64>,
    ) -> Result<u64, CommandError> {
        let span = if telemetry::enabled() {
            tracing::info_span!(target: telemetry::TARGET, "supervision.calibrate",
                freshet.base = %base.display(), freshet.base_version = version.map(|v| v as i64),
                freshet.version = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let installed = self.calibrate_inner(base, version).await;
        match &installed {
            Ok(v) => {
                span.record("freshet.version", *v as i64);
            }
            Err(e) => telemetry::set_attribute(&span, "error.message", e.to_string()),
        }
        installed
    }

    async fn calibrate_inner(
        &self,
        base: PathBuf,
        version: Option<u64>,
    ) -> Result<u64, CommandError> {
        let b = base.clone();
        let (v, m) = tokio::task::spawn_blocking(move || {
            let store = ModelStore::open_existing(&b)
                .map_err(|e| CommandError::NotFound(format!("base store {}: {e}", b.display())))?;
            let v = match version {
                Some(v) => v,
                None => store
                    .latest()
                    .map_err(anyhow::Error::from)?
                    .ok_or_else(|| {
                        CommandError::NotFound(format!(
                            "base store {} holds no version",
                            b.display()
                        ))
                    })?,
            };
            let m = store
                .manifest(v)
                .map_err(|e| CommandError::NotFound(format!("base version {v}: {e}")))?;
            Ok::<_, CommandError>((v, m))
        })
        .await
        .map_err(anyhow::Error::from)??;
        if m.sample_offsets.is_empty() {
            return Err(CommandError::Invalid(format!(
                "version {v} of {} records no sample-log offsets, so there is nowhere to \
                 resume from; train the base with `freshet train --from-log`",
                base.display()
            )));
        }
        let samples = &self.ctx.cfg.logs.samples;
        for (&p, &o) in &m.sample_offsets {
            if p >= samples.partitions() {
                return Err(CommandError::Invalid(format!(
                    "the base model has offsets for sample partition {p}, but this node's \
                     sample log has {} partitions: it was trained on another log",
                    samples.partitions()
                )));
            }
            let high = samples.high_watermark(p).map_err(anyhow::Error::from)?;
            if o > high {
                return Err(CommandError::Invalid(format!(
                    "the base model's offset {o} for sample partition {p} is beyond this node's \
                     sample log (high watermark {high}): it was trained on another log"
                )));
            }
        }
        let fresh = &self.ctx.cfg.fresh;
        if m.schema != fresh.schema {
            return Err(CommandError::Invalid(
                "the base model's schema differs from this node's".into(),
            ));
        }
        self.ctx.plan().calibrate = Some(CalibrationSource {
            store: base,
            version: v,
        });
        self.sup.restart_from("writer").await?;
        let store = self.ctx.cfg.store.clone();
        let installed = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<u64>> {
            for w in store.versions()?.into_iter().rev() {
                if store.manifest(w)?.calibrated_from.is_some() {
                    return Ok(Some(w));
                }
            }
            Ok(None)
        })
        .await
        .map_err(anyhow::Error::from)??;
        installed.ok_or_else(|| {
            CommandError::Failed(anyhow::anyhow!("the base model was not installed"))
        })
    }

    /// Finishes the batch in progress, writes a last version, stops every actor and flushes
    /// the logs. Returns the last version written.
    pub async fn shutdown(&self) -> anyhow::Result<Option<u64>> {
        let trainer = self.ctx.reg().trainer.clone();
        let last = match trainer {
            Some(t) => t.finish().await.context("writing the last version")?,
            None => None,
        };
        self.sup.shutdown().await;
        let logs = &self.ctx.cfg.logs;
        for l in [
            &logs.events,
            &logs.samples,
            &logs.dead_letters,
            &logs.sample_rejects,
        ] {
            l.flush()
                .with_context(|| format!("flushing topic {}", l.topic()))?;
        }
        Ok(last)
    }
}
