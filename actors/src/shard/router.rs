//! [`ShardRouter`]: every shard of a node's tables behind one handle, each key routed by
//! [`shard_of`], and the [`ShardPlan`] a training step makes once for its lookup and its push.

use crate::embedding::{ApplyReport, ShardSnapshot, TableConfig, TrainCtx};
use crate::fault::Faults;
use crate::ids::{FeatureId, ShardId, TableName};
use crate::routing::shard_of;

use super::*;

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

/// Where a job's shard owners run when not in this process: the cluster crate places them on
/// other nodes and returns a router of handles that reach them over the network. The job
/// sees the same [`ShardRouter`] either way.
pub trait ShardPlacer: Send + Sync + std::fmt::Debug {
    /// Starts `count` owners of `tables`, shard `i` from `restore[i]` when given.
    fn place(
        &self,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        restore: Vec<Option<ShardSnapshot>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<ShardRouter>> + Send + '_>>;

    /// Starts the owner of shard `shard` of `count` (empty: the trainer restores it), and a
    /// handle to it linked to `supervisor`, so that a pipeline supervises each shard as a
    /// child. The first call fixes the placement; later ones (a restarted child) keep it.
    fn place_shard(
        &self,
        shard: ShardId,
        count: u32,
        tables: Vec<(TableName, TableConfig)>,
        supervisor: ractor::ActorCell,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<ShardHandle>> + Send + '_>>;

    /// The placement made so far, for the versions' manifests.
    fn placement(&self) -> Option<crate::ckpt::ShardPlacement>;

    /// The node this placer runs on: where the rest of a job runs.
    fn local_node(&self) -> String;
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
    /// Where the owners run, when a cluster placed them.
    placement: Option<crate::ckpt::ShardPlacement>,
}

impl ShardRouter {
    /// `shards[i]` must be the handle of shard `i`.
    pub fn new(shards: Vec<ShardHandle>) -> Self {
        assert!(!shards.is_empty(), "a router needs at least one shard");
        for (i, h) in shards.iter().enumerate() {
            assert_eq!(h.shard() as usize, i, "shard handles out of order");
        }
        Self {
            shards,
            placement: None,
        }
    }

    /// The router, recording where a cluster placed its owners (versions written through it
    /// record it in their manifests).
    pub fn with_placement(mut self, placement: crate::ckpt::ShardPlacement) -> Self {
        self.placement = Some(placement);
        self
    }

    pub fn placement(&self) -> Option<&crate::ckpt::ShardPlacement> {
        self.placement.as_ref()
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
        self.send_lookup_for_training(table, dim, plan, ctx, &tracing::Span::none())?
            .wait(plan)
            .await
    }

    /// Puts each shard's part of `plan`'s training lookup in its owner's mailbox before
    /// returning, behind whatever was sent to it before (a previous step's gradients, say);
    /// the rows come with [`PendingRows::wait`]. A sampled `step` span gets a child span per
    /// shard asked.
    pub fn send_lookup_for_training(
        &self,
        table: &TableName,
        dim: usize,
        plan: &ShardPlan,
        ctx: TrainCtx,
        step: &tracing::Span,
    ) -> Result<PendingRows, ShardError> {
        self.send_rows(plan, dim, |h, ks| {
            h.send_lookup_for_training(table, ks, ctx, step)
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
        self.send_gradients(
            table,
            dim,
            &self.plan(keys),
            grads,
            ctx,
            &tracing::Span::none(),
        )?
        .wait()
        .await
    }

    /// Puts each shard's part of `grads` (`dim` floats per key of `plan`, in the plan's key
    /// order) in its owner's mailbox before returning; the answers come with
    /// [`PendingGradients::wait`]. What any caller sends a shard after this returns sees the
    /// gradients applied (see [`ShardHandle::send_gradients`]). A sampled `step` span gets a
    /// child span per shard pushed to.
    pub fn send_gradients(
        &self,
        table: &TableName,
        dim: usize,
        plan: &ShardPlan,
        grads: &[f32],
        ctx: TrainCtx,
        step: &tracing::Span,
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
            pending.push(self.shards[s].send_gradients(table, ks.clone(), g, ctx, step)?);
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
