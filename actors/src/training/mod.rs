//! Training, offline and online, through one step.
//!
//! - [`step`]: [`Trainer`], the training step: dedupe, look up through the ShardOwners, pool,
//!   forward and backward, dense update, sparse push. It wraps the [`Scorer`], the forward
//!   pass that serving uses alone.
//! - [`feed`]: the online trainer's cursor over the sample log (live offsets, replays).
//! - [`online`]: [`TrainerActor`], which pulls batches from the sample log, trains, and
//!   captures versions with the offsets they contain.
//! - [`offline`]: the offline driver behind `freshet train`: files or the sample log in,
//!   epochs, evaluation, versions out.
//!
//! Both drivers build the trainer of a version through [`trainer_at`] (which checks the
//! version's tables against its model first) and close a version through [`boundary`], so a
//! version means the same whoever wrote it: every shard and the dense net at one step
//! boundary, with the sample offsets and counts that lead to it. The online trainer restores
//! into running owners ([`restore`]); the offline driver reads the version whole before it
//! reads any data, so a bad version fails at once, and starts its owners from the snapshots.

pub mod feed;
pub mod offline;
pub mod online;
pub mod step;

use std::collections::BTreeMap;

use anyhow::Context;

use crate::ckpt::writer::StepBoundary;
use crate::ckpt::{Manifest, ModelStore, ReplayRecord, VersionMeta};
use crate::dense::{DenseNet, DenseState, ModelConfig};
use crate::embedding::{Initializer, OptimizerConfig, TableConfig};
use crate::sample::Schema;
use crate::scorer::Scorer;
use crate::shard::ShardRouter;
use crate::stream::Offset;

pub use online::{
    FinishError, TrainStart, TrainerActor, TrainerActorHandle, TrainerActorState, TrainerArgs,
    TrainerMsg, TrainerRequest, TrainerStatus,
};
pub use step::{StepReport, Trainer};

/// The model a trainer starts when there is no version to resume from: the online trainer on
/// an empty store, the offline driver without `--init`.
#[derive(Clone, Debug)]
pub struct FreshModel {
    pub schema: Schema,
    pub model: ModelConfig,
    pub tables: BTreeMap<String, TableConfig>,
}

/// The embedding table config the trainer uses for a schema table when none is configured:
/// N(0, 0.01²) rows and Adagrad(lr 0.05, initial accumulator 0.1), as the PyTorch peer trains
/// its embeddings.
pub fn default_table_config(row_dim: usize) -> TableConfig {
    let mut c = TableConfig::with_dim(row_dim);
    c.init = Initializer::Normal {
        mean: 0.0,
        std: 0.01,
    };
    c.optimizer = OptimizerConfig::Adagrad {
        lr: 0.05,
        initial_accumulator: 0.1,
        eps: 1e-10,
    };
    c
}

/// The trainer of a restored version: its dense net at its step. Checks first that the
/// manifest's tables give every row the model reads, at the right dim, before any lookup
/// slices them: a manifest of format v1 or v2 carries no checksum of its own, and a sealed
/// one can still describe tables that another model wrote.
pub fn trainer_at(manifest: &Manifest, dense: DenseState) -> anyhow::Result<Trainer> {
    Scorer::check_tables(&manifest.schema, &manifest.model, &manifest.tables)?;
    let net = DenseNet::from_state(dense)?;
    let mut t = Trainer::with_net(manifest.schema.clone(), net)?;
    t.set_step(manifest.step);
    Ok(t)
}

/// Restores every shard behind `shards` and the dense net to version `v` of `store`. Returns
/// the trainer, at the version's step, and the version's manifest.
///
/// The owners restore side by side. A local owner reads its own files: a full version streams
/// from disk into its tables without a snapshot in between; a remote owner is sent its shard.
/// A version written in another shard count is read and re-routed once, and each owner is
/// sent its part.
pub async fn restore(
    store: &ModelStore,
    shards: &ShardRouter,
    v: u64,
) -> anyhow::Result<(Trainer, Manifest)> {
    let s = store.clone();
    let (manifest, dense) = tokio::task::spawn_blocking(move || s.restore_dense(v))
        .await
        .context("restore task")?
        .with_context(|| format!("restoring the dense state of version {v}"))?;
    let trainer = trainer_at(&manifest, dense)
        .with_context(|| format!("version {v} does not fit its own tables"))?;
    let count = shards.shards().len() as u32;
    let handles = shards.shards();
    if manifest.shards == count {
        let mut tasks = tokio::task::JoinSet::new();
        for h in handles {
            let (h, store) = (h.clone(), store.clone());
            tasks.spawn(async move {
                let i = h.shard();
                if h.is_local() {
                    h.restore_from(&store, v)
                        .await
                        .with_context(|| format!("restoring shard {i} of version {v}"))?;
                    return anyhow::Ok(());
                }
                let (snap, _) =
                    tokio::task::spawn_blocking(move || store.restore_shard(v, i, count))
                        .await
                        .context("restore task")?
                        .with_context(|| format!("restoring shard {i} of version {v}"))?;
                h.restore(snap)
                    .await
                    .with_context(|| format!("loading version {v} into shard {i}"))?;
                Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.context("restore task")??;
        }
    } else {
        let s = store.clone();
        let r = tokio::task::spawn_blocking(move || s.restore(v, Some(count)))
            .await
            .context("restore task")?
            .with_context(|| format!("restoring the shards of version {v}"))?;
        for (h, snap) in handles.iter().zip(r.shards) {
            let i = h.shard();
            h.restore(snap)
                .await
                .with_context(|| format!("loading version {v} into shard {i}"))?;
        }
    }
    Ok((trainer, manifest))
}

/// Restores version `first` as [`restore`] does; when the version fails verification (a
/// file missing or corrupt, a broken chain), sets it aside in the store's quarantine with
/// every version restored through the one at fault, and tries the newest live version left.
/// `None` when none is left: the caller starts a fresh model (from offset 0, so that no
/// sample is counted twice).
pub async fn restore_newest_good(
    store: &ModelStore,
    shards: &ShardRouter,
    first: u64,
) -> anyhow::Result<Option<(Trainer, Manifest)>> {
    let mut v = first;
    loop {
        let err = match restore(store, shards, v).await {
            Ok(r) => return Ok(Some(r)),
            Err(e) => e,
        };
        let Some(cause) = err
            .chain()
            .find_map(|c| c.downcast_ref::<crate::ckpt::CkptError>())
            .filter(|c| c.is_integrity())
        else {
            return Err(err);
        };
        let why = format!("{err:#}");
        let at_fault = store.version_at_fault(cause);
        let s = store.clone();
        let set_aside = tokio::task::spawn_blocking(move || {
            s.set_aside_failed_restore(v, at_fault, &why)?;
            s.latest_live()
        })
        .await
        .context("quarantine task")?
        .context("setting aside a version that failed verification")?;
        tracing::error!(
            version = v,
            at_fault = at_fault.unwrap_or(v),
            next = ?set_aside,
            error = %format!("{err:#}"),
            "a version failed verification: set aside in the store's quarantine/, resuming from the newest good version"
        );
        match set_aside {
            Some(next) => v = next,
            None => return Ok(None),
        }
    }
}

/// What a version records of the training behind it, besides the model: the samples it holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lineage {
    pub rows_trained: u64,
    pub samples_rejected: u64,
    /// Replays finished since the last version.
    pub replays: Vec<ReplayRecord>,
    /// Per sample partition, the next offset to consume.
    pub sample_offsets: BTreeMap<u32, Offset>,
}

/// The version boundary after `trainer`'s last step: its dense state and step, the tables it
/// trains, and `lineage`. The caller has flushed the trainer's last push
/// ([`Trainer::flush`]), so the shards hold every step before the boundary.
pub fn boundary(
    trainer: &Trainer,
    tables: &BTreeMap<String, TableConfig>,
    lineage: Lineage,
) -> StepBoundary {
    StepBoundary {
        meta: VersionMeta {
            step: trainer.step(),
            rows_trained: lineage.rows_trained,
            samples_rejected: lineage.samples_rejected,
            replays: lineage.replays,
            calibrated_from: None,
            sample_offsets: lineage.sample_offsets,
            joiner_offsets: BTreeMap::new(),
            model: trainer.net().config().clone(),
            schema: trainer.schema().clone(),
            tables: tables.clone(),
            placement: None,
        },
        dense: trainer.net().state(),
        full: false,
    }
}
