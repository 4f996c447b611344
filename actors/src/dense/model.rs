//! The model zoo: LR, Wide&Deep, DeepFM, DCN-v2 and DLRM over one flat parameter vector.
//!
//! Every model reads the same input: per sample, the pooled embeddings of every field followed
//! by the dense features (`x`, `rows x input_dim`), plus the pooled wide weights summed over
//! fields (`wide`, one per sample) for the models with a wide part. It returns the logit's
//! gradient with respect to both, so the trainer can push sparse gradients back to the shards.

use serde::{Deserialize, Serialize};

use super::gemm::Threads;
use super::layers::{self, Cross, InputGrad, Linear};
use super::optim::{DenseOptimizer, DenseOptimizerConfig};
use crate::embedding::InvalidValue;
use crate::rng::Xoshiro256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Logistic regression: wide weights per id plus a linear term on the dense features.
    Lr,
    /// Wide&Deep: LR plus an MLP over the embeddings and dense features.
    Wdl,
    /// DeepFM: Wide&Deep plus the FM second-order term over the field embeddings.
    Deepfm,
    /// DCN-v2: full-rank cross layers over the input, then an MLP (stacked).
    Dcn,
    /// DLRM: a bottom MLP over the dense features, pairwise dot interaction with the field
    /// embeddings, and a top MLP.
    Dlrm,
}

/// A model name that is none of [`ModelKind`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown model {0:?}; expected lr, wdl, deepfm, dcn or dlrm")]
pub struct UnknownModel(pub String);

impl std::str::FromStr for ModelKind {
    type Err = UnknownModel;
    fn from_str(s: &str) -> Result<Self, UnknownModel> {
        match s {
            "lr" => Ok(Self::Lr),
            "wdl" | "wide_deep" => Ok(Self::Wdl),
            "deepfm" => Ok(Self::Deepfm),
            "dcn" | "dcnv2" | "dcn_v2" => Ok(Self::Dcn),
            "dlrm" => Ok(Self::Dlrm),
            o => Err(UnknownModel(o.to_owned())),
        }
    }
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Lr => "lr",
            Self::Wdl => "wdl",
            Self::Deepfm => "deepfm",
            Self::Dcn => "dcn",
            Self::Dlrm => "dlrm",
        }
    }

    /// Whether the model has per-id wide weights (one extra column in each table row).
    pub fn has_wide(self) -> bool {
        matches!(self, Self::Lr | Self::Wdl | Self::Deepfm)
    }

    /// Whether the model reads field embeddings at all.
    pub fn has_embeddings(self) -> bool {
        !matches!(self, Self::Lr)
    }

    fn default_hidden(self) -> Vec<usize> {
        match self {
            Self::Lr => vec![],
            Self::Wdl | Self::Dcn => vec![1024, 512, 256],
            Self::Deepfm => vec![400, 400, 400],
            Self::Dlrm => vec![512, 256],
        }
    }
}

/// Layer sizes and the dense optimizer. Configured under `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// The deep tower's hidden widths (DLRM: the top MLP). `None`: the model's standard sizes
    /// (W&D and DCN 1024-512-256, DeepFM 400-400-400, DLRM top 512-256).
    #[serde(default)]
    pub hidden: Option<Vec<usize>>,
    /// DCN-v2 cross layers.
    #[serde(default = "default_cross_layers")]
    pub cross_layers: usize,
    /// DLRM's bottom MLP hidden widths; its last layer maps to the embedding dim.
    #[serde(default = "default_bottom")]
    pub bottom: Vec<usize>,
    #[serde(default)]
    pub optimizer: DenseOptimizerConfig,
    /// Seeds the dense initialisation.
    #[serde(default)]
    pub seed: u64,
}

fn default_cross_layers() -> usize {
    3
}
fn default_bottom() -> Vec<usize> {
    vec![64]
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::new(ModelKind::Wdl)
    }
}

impl ModelConfig {
    pub fn new(kind: ModelKind) -> Self {
        Self {
            kind,
            hidden: None,
            cross_layers: default_cross_layers(),
            bottom: default_bottom(),
            optimizer: DenseOptimizerConfig::default(),
            seed: 0,
        }
    }

    pub fn hidden(&self) -> Vec<usize> {
        self.hidden
            .clone()
            .unwrap_or_else(|| self.kind.default_hidden())
    }

    pub fn validate(&self, prefix: &str, shape: &InputShape) -> Result<(), InvalidValue> {
        if self
            .hidden()
            .iter()
            .chain(&self.bottom)
            .any(|&w| w == 0 || w > 65_536)
        {
            return Err(InvalidValue::new(
                format!("{prefix}.hidden"),
                format!("{:?}", self.hidden()),
                "layer widths in 1..=65536",
            ));
        }
        if self.kind == ModelKind::Dcn && !(1..=16).contains(&self.cross_layers) {
            return Err(InvalidValue::new(
                format!("{prefix}.cross_layers"),
                self.cross_layers,
                "1..=16 cross layers",
            ));
        }
        if matches!(self.kind, ModelKind::Deepfm | ModelKind::Dlrm) {
            if let Some(&d) = shape.fields.first() {
                if shape.fields.iter().any(|&e| e != d) {
                    return Err(InvalidValue::new(
                        "schema.fields.dim",
                        format!("{:?}", shape.fields),
                        format!(
                            "one dim for every field ({} interacts fields pairwise)",
                            self.kind.name()
                        ),
                    ));
                }
            }
        }
        self.optimizer.validate(&format!("{prefix}.optimizer"))
    }
}

/// What the model is fed: the embedding dim of each field (0 for models without embeddings)
/// and the number of dense features.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputShape {
    pub fields: Vec<usize>,
    pub dense: usize,
}

impl InputShape {
    /// Columns of `x`: every field's embedding, then the dense features.
    pub fn input_dim(&self) -> usize {
        self.fields.iter().sum::<usize>() + self.dense
    }
}

/// The dense network's parameters and optimizer state: what a checkpoint saves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseState {
    pub config: ModelConfig,
    pub shape: InputShape,
    #[serde(with = "crate::embedding::snapshot::f32_bytes")]
    pub params: Vec<f32>,
    pub optimizer: DenseOptimizer,
    /// The summed gradient of samples trained since the last dense update, when updates come
    /// every `n` samples and fewer than `n` have arrived ([`DenseNet::train_step_of`]). A
    /// version saves it so that a restart continues the update it was part of.
    #[serde(default)]
    pub pending: Option<PendingUpdate>,
}

/// Gradients summed towards the next dense update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingUpdate {
    /// Samples whose gradients `grads` holds.
    pub rows: usize,
    #[serde(with = "crate::embedding::snapshot::f32_bytes")]
    pub grads: Vec<f32>,
}

/// Per-batch buffers, grown to the largest batch seen and then reused. (DCN's and DLRM's
/// backward passes still allocate two small temporaries per step.)
#[derive(Debug, Default)]
struct Workspace {
    rows: usize,
    x: Vec<f32>,
    dx: Vec<f32>,
    wide: Vec<f32>,
    dense: Vec<f32>,
    logit: Vec<f32>,
    dlogit: Vec<f32>,
    pred: Vec<f32>,
    tmp: Vec<f32>,
    /// Activations of the deep tower (`acts[i]` is layer i's output).
    acts: Vec<Vec<f32>>,
    grads_a: Vec<f32>,
    grads_b: Vec<f32>,
    /// DCN: each cross layer's `u` and output; DLRM: bottom activations, Z, dots, top input.
    cross_u: Vec<Vec<f32>>,
    cross_out: Vec<Vec<f32>>,
    bottom: Vec<Vec<f32>>,
    z: Vec<f32>,
    dz: Vec<f32>,
    top_in: Vec<f32>,
}

/// A model with its parameters, gradients, optimizer and buffers.
#[derive(Debug)]
pub struct DenseNet {
    config: ModelConfig,
    shape: InputShape,
    params: Vec<f32>,
    grads: Vec<f32>,
    opt: DenseOptimizer,
    /// See [`DenseState::pending`].
    pending: Option<PendingUpdate>,
    lin: Option<Linear>,
    tower: Vec<Linear>,
    cross: Vec<Cross>,
    bottom: Vec<Linear>,
    ws: Workspace,
}

/// What one training step reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepLoss {
    /// Summed weighted BCE over the batch.
    pub loss_sum: f64,
    pub rows: usize,
}

impl DenseNet {
    pub fn new(config: ModelConfig, shape: InputShape) -> anyhow::Result<Self> {
        Self::build(config, shape, None)
    }

    /// A net that scores with `params` (a version's weights): its optimizer is fresh, as
    /// scoring never steps it. Cheaper than [`DenseNet::from_state`] for serving: nothing is
    /// initialised only to be overwritten, and the moments are zero pages never touched.
    pub fn from_weights(
        config: ModelConfig,
        shape: InputShape,
        params: Vec<f32>,
    ) -> anyhow::Result<Self> {
        Self::build(config, shape, Some(params))
    }

    fn build(
        config: ModelConfig,
        shape: InputShape,
        weights: Option<Vec<f32>>,
    ) -> anyhow::Result<Self> {
        config.validate("model", &shape)?;
        let mut at = 0usize;
        let mut take = |n: usize| {
            let a = at;
            at += n;
            a
        };
        let k = config.kind;
        let lin = k.has_wide().then(|| Linear {
            inp: shape.dense,
            out: 1,
            at: take(Linear::param_count(shape.dense, 1)),
            relu: false,
        });
        let mut cross = Vec::new();
        let mut bottom = Vec::new();
        let emb_dim = shape.fields.first().copied().unwrap_or(0);
        let tower_in = match k {
            ModelKind::Lr => 0,
            ModelKind::Wdl | ModelKind::Deepfm => shape.input_dim(),
            ModelKind::Dcn => {
                let d = shape.input_dim();
                for _ in 0..config.cross_layers {
                    cross.push(Cross {
                        dim: d,
                        at: take(Cross::param_count(d)),
                    });
                }
                d
            }
            ModelKind::Dlrm => {
                let mut inp = shape.dense;
                for &w in config.bottom.iter().chain(std::iter::once(&emb_dim)) {
                    bottom.push(Linear {
                        inp,
                        out: w,
                        at: take(Linear::param_count(inp, w)),
                        relu: true,
                    });
                    inp = w;
                }
                emb_dim + layers::dot_pairs(shape.fields.len() + 1)
            }
        };
        let mut tower = Vec::new();
        if k != ModelKind::Lr {
            let mut inp = tower_in;
            let hidden = config.hidden();
            for (i, &w) in hidden.iter().chain(std::iter::once(&1)).enumerate() {
                tower.push(Linear {
                    inp,
                    out: w,
                    at: take(Linear::param_count(inp, w)),
                    relu: i < hidden.len(),
                });
                inp = w;
            }
        }
        let n = at;
        let params = match weights {
            Some(w) => {
                anyhow::ensure!(
                    w.len() == n,
                    "the weights have {} parameters, the model's config implies {n}",
                    w.len()
                );
                w
            }
            None => {
                // PyTorch's default Linear initialisation: W and b uniform in ±1/sqrt(fan_in).
                let mut params = vec![0f32; n];
                let mut rng = Xoshiro256::seed_from_u64(config.seed);
                let init =
                    |p: &mut [f32], at: usize, inp: usize, count: usize, rng: &mut Xoshiro256| {
                        let bound = 1.0 / (inp.max(1) as f32).sqrt();
                        for v in &mut p[at..at + count] {
                            *v = (rng.next_f32() * 2.0 - 1.0) * bound;
                        }
                    };
                for l in lin.iter().chain(&bottom).chain(&tower) {
                    init(
                        &mut params,
                        l.at,
                        l.inp,
                        Linear::param_count(l.inp, l.out),
                        &mut rng,
                    );
                }
                for c in &cross {
                    init(
                        &mut params,
                        c.at,
                        c.dim,
                        Cross::param_count(c.dim),
                        &mut rng,
                    );
                }
                params
            }
        };
        let opt = DenseOptimizer::new(config.optimizer.clone(), n);
        Ok(Self {
            config,
            shape,
            grads: vec![0.0; n],
            params,
            opt,
            pending: None,
            lin,
            tower,
            cross,
            bottom,
            ws: Workspace::default(),
        })
    }

    /// Rebuilds a model from saved state.
    pub fn from_state(state: DenseState) -> anyhow::Result<Self> {
        let mut net = Self::new(state.config, state.shape)?;
        anyhow::ensure!(
            state.params.len() == net.params.len(),
            "saved model has {} parameters, its config implies {}",
            state.params.len(),
            net.params.len()
        );
        let o = &state.optimizer;
        anyhow::ensure!(
            o.config == net.config.optimizer
                && o.m.len() == net.opt.m.len()
                && o.v.len() == net.opt.v.len(),
            "saved optimizer state does not match the model's optimizer"
        );
        if let Some(p) = &state.pending {
            anyhow::ensure!(
                p.grads.len() == net.params.len(),
                "saved pending update has {} gradients for {} parameters",
                p.grads.len(),
                net.params.len()
            );
        }
        net.params = state.params;
        net.opt = state.optimizer;
        net.pending = state.pending;
        Ok(net)
    }

    pub fn state(&self) -> DenseState {
        DenseState {
            config: self.config.clone(),
            shape: self.shape.clone(),
            params: self.params.clone(),
            optimizer: self.opt.clone(),
            pending: self.pending.clone(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn shape(&self) -> &InputShape {
        &self.shape
    }

    pub fn param_count(&self) -> usize {
        self.params.len()
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn optimizer_step(&self) -> u64 {
        self.opt.step
    }

    /// Dense FLOPs of one training step per sample, counted as the PyTorch peer counts them:
    /// `6 * Σ in * out` over the GEMM layers (forward 2, backward 4).
    pub fn flops_per_sample(&self) -> f64 {
        let lin: usize = self
            .tower
            .iter()
            .chain(&self.bottom)
            .map(|l| l.inp * l.out)
            .sum::<usize>()
            + self.cross.iter().map(|c| c.dim * c.dim).sum::<usize>();
        6.0 * lin as f64
    }

    fn ensure_rows(&mut self, rows: usize) {
        if rows <= self.ws.rows {
            return;
        }
        let ws = &mut self.ws;
        let d = self.shape.input_dim();
        ws.rows = rows;
        ws.x.resize(rows * d, 0.0);
        ws.dx.resize(rows * d, 0.0);
        ws.wide.resize(rows, 0.0);
        ws.dense.resize(rows * self.shape.dense, 0.0);
        for v in [&mut ws.logit, &mut ws.dlogit, &mut ws.pred, &mut ws.tmp] {
            v.resize(rows, 0.0);
        }
        ws.acts = self.tower.iter().map(|l| vec![0.0; rows * l.out]).collect();
        let widest = self
            .tower
            .iter()
            .chain(&self.bottom)
            .map(|l| l.inp.max(l.out))
            .chain(self.cross.iter().map(|c| c.dim))
            .max()
            .unwrap_or(1);
        ws.grads_a.resize(rows * widest, 0.0);
        ws.grads_b.resize(rows * widest, 0.0);
        ws.cross_u = self.cross.iter().map(|_| vec![0.0; rows * d]).collect();
        ws.cross_out = self.cross.iter().map(|_| vec![0.0; rows * d]).collect();
        ws.bottom = self
            .bottom
            .iter()
            .map(|l| vec![0.0; rows * l.out])
            .collect();
        if self.config.kind == ModelKind::Dlrm {
            let n = self.shape.fields.len() + 1;
            let e = self.shape.fields.first().copied().unwrap_or(0);
            ws.z.resize(rows * n * e, 0.0);
            ws.dz.resize(rows * n * e, 0.0);
            ws.top_in.resize(rows * self.tower[0].inp, 0.0);
        }
    }

    /// The input buffers for a batch of `rows`: `x` (`rows x input_dim`) and the wide sums.
    /// The caller fills both, then calls [`Self::forward`] or [`Self::train_step`].
    pub fn inputs_mut(&mut self, rows: usize) -> (&mut [f32], &mut [f32]) {
        self.ensure_rows(rows);
        let d = self.shape.input_dim();
        (&mut self.ws.x[..rows * d], &mut self.ws.wide[..rows])
    }

    /// Gradients of the summed loss (each sample's own) with respect to `x` and to each
    /// sample's wide sum, valid after [`Self::train_step`]. Only the embedding columns of `x` are filled.
    pub fn input_grads(&self, rows: usize) -> (&[f32], &[f32]) {
        let d = self.shape.input_dim();
        (&self.ws.dx[..rows * d], &self.ws.dlogit[..rows])
    }

    /// Click probabilities after [`Self::forward`] or [`Self::train_step`].
    pub fn predictions(&self, rows: usize) -> &[f32] {
        &self.ws.pred[..rows]
    }

    /// Computes the logits and predictions of the batch in the input buffers.
    pub fn forward(&mut self, rows: usize, th: &Threads) {
        self.ensure_rows(rows);
        let (d, nd) = (self.shape.input_dim(), self.shape.dense);
        let emb_cols = d - nd;
        let ws = &mut self.ws;
        let p = &self.params;
        for r in 0..rows {
            ws.dense[r * nd..(r + 1) * nd].copy_from_slice(&ws.x[r * d + emb_cols..(r + 1) * d]);
        }
        let logit = &mut ws.logit[..rows];
        logit.fill(0.0);
        if self.config.kind.has_wide() {
            for (l, w) in logit.iter_mut().zip(&ws.wide) {
                *l += w;
            }
        }
        if let Some(lin) = &self.lin {
            lin.forward(p, &ws.dense, rows, &mut ws.tmp, th);
            for (l, t) in logit.iter_mut().zip(&ws.tmp) {
                *l += t;
            }
        }
        let tower_in: &[f32] = match self.config.kind {
            ModelKind::Lr => &[],
            ModelKind::Wdl | ModelKind::Deepfm => &ws.x,
            ModelKind::Dcn => {
                for (i, c) in self.cross.iter().enumerate() {
                    let (done, rest) = ws.cross_out.split_at_mut(i);
                    let xl: &[f32] = if i == 0 { &ws.x } else { &done[i - 1] };
                    c.forward(p, &ws.x, xl, rows, &mut ws.cross_u[i], &mut rest[0], th);
                }
                &ws.cross_out[self.cross.len() - 1]
            }
            ModelKind::Dlrm => {
                for (i, l) in self.bottom.iter().enumerate() {
                    let (done, rest) = ws.bottom.split_at_mut(i);
                    let inp: &[f32] = if i == 0 { &ws.dense } else { &done[i - 1] };
                    l.forward(p, inp, rows, &mut rest[0], th);
                }
                let bo = &ws.bottom[self.bottom.len() - 1];
                let (nf, e) = (self.shape.fields.len(), self.shape.fields[0]);
                let n = nf + 1;
                for r in 0..rows {
                    let z = &mut ws.z[r * n * e..(r + 1) * n * e];
                    z[..e].copy_from_slice(&bo[r * e..(r + 1) * e]);
                    z[e..].copy_from_slice(&ws.x[r * d..r * d + nf * e]);
                }
                let t = layers::dot_pairs(n);
                let ti = e + t;
                // Dots go to the scratch buffer, then beside the bottom output.
                layers::dot_forward(&ws.z, rows, n, e, &mut ws.grads_a);
                for r in 0..rows {
                    let o = &mut ws.top_in[r * ti..(r + 1) * ti];
                    o[..e].copy_from_slice(&bo[r * e..(r + 1) * e]);
                    o[e..].copy_from_slice(&ws.grads_a[r * t..(r + 1) * t]);
                }
                &ws.top_in
            }
        };
        for (i, l) in self.tower.iter().enumerate() {
            let (done, rest) = ws.acts.split_at_mut(i);
            let inp: &[f32] = if i == 0 { tower_in } else { &done[i - 1] };
            l.forward(p, inp, rows, &mut rest[0], th);
        }
        if let Some(last) = ws.acts.last() {
            for (l, t) in logit.iter_mut().zip(last) {
                *l += t;
            }
        }
        if self.config.kind == ModelKind::Deepfm {
            let (nf, e) = (self.shape.fields.len(), self.shape.fields[0]);
            let x = &ws.x;
            // Per row, so the two row blocks run side by side.
            layers::by_row_halves(th.share(), rows, &mut ws.tmp, 1, |r0, n, out| {
                layers::fm_forward(&x[r0 * d..], d, n, nf, e, out);
            });
            for (l, t) in logit.iter_mut().zip(&ws.tmp) {
                *l += t;
            }
        }
        for (p, &z) in ws.pred[..rows].iter_mut().zip(logit.iter()) {
            *p = layers::sigmoid(z);
        }
    }

    /// Forward, loss, backward and the dense update for the batch in the input buffers, the
    /// batch being one update ([`Self::train_step_of`] with `per_update = rows`).
    /// Afterwards [`Self::input_grads`] holds what the sparse side needs.
    pub fn train_step(
        &mut self,
        rows: usize,
        labels: &[f32],
        weights: &[f32],
        th: &Threads,
    ) -> StepLoss {
        self.train_step_of(rows, labels, weights, rows, th)
    }

    /// Forward, loss and backward for the batch in the input buffers, where the dense
    /// optimizer updates once per `per_update` samples, however they arrive in batches.
    ///
    /// The loss is the sum of the samples' losses, so a sample's gradient does not depend on
    /// the batch it shares:
    /// - [`Self::input_grads`] (what the sparse rows receive) is each sample's own loss
    ///   gradient; a table then sums it per id, as sparse optimizers in this field do;
    /// - the dense gradients are summed until `per_update` samples have contributed, and the
    ///   optimizer steps on their mean. A caller that keeps its batches within
    ///   [`Self::rows_to_update`] makes every update hold exactly `per_update` samples, so an
    ///   optimizer that normalises its steps (Adam) takes as many of them for the same samples
    ///   whatever the arrival rate, and a full batch updates as a batch mean always did.
    pub fn train_step_of(
        &mut self,
        rows: usize,
        labels: &[f32],
        weights: &[f32],
        per_update: usize,
        th: &Threads,
    ) -> StepLoss {
        let per_update = per_update.max(1);
        self.forward(rows, th);
        let loss_sum = {
            let ws = &mut self.ws;
            layers::bce_with_logits(
                &ws.logit[..rows],
                labels,
                weights,
                1.0,
                &mut ws.pred[..rows],
                &mut ws.dlogit[..rows],
            )
        };
        self.backward(rows, th);
        let inv = 1.0 / per_update as f32;
        match self.pending.take() {
            // A whole update in one batch: no copy through the pending sum.
            None if rows >= per_update => {
                self.grads.iter_mut().for_each(|g| *g *= inv);
                self.opt.apply(&mut self.params, &self.grads);
            }
            pending => {
                let mut p = pending.unwrap_or_else(|| PendingUpdate {
                    rows: 0,
                    grads: vec![0.0; self.grads.len()],
                });
                for (a, g) in p.grads.iter_mut().zip(&self.grads) {
                    *a += g;
                }
                p.rows += rows;
                if p.rows >= per_update {
                    p.grads.iter_mut().for_each(|g| *g *= inv);
                    self.opt.apply(&mut self.params, &p.grads);
                } else {
                    self.pending = Some(p);
                }
            }
        }
        StepLoss { loss_sum, rows }
    }

    /// Samples still to train before the next dense update, when updates come every
    /// `per_update` samples.
    pub fn rows_to_update(&self, per_update: usize) -> usize {
        let have = self.pending.as_ref().map_or(0, |p| p.rows);
        per_update.max(1).saturating_sub(have).max(1)
    }

    fn backward(&mut self, rows: usize, th: &Threads) {
        let d = self.shape.input_dim();
        let kind = self.config.kind;
        let ws = &mut self.ws;
        let p = &self.params;
        let g = &mut self.grads;
        // W&D and DeepFM feed x to the tower as it is: its first layer writes every column of
        // dx, so it writes straight there instead of through `grads_a` and a copy.
        let tower_writes_dx = matches!(kind, ModelKind::Wdl | ModelKind::Deepfm);
        if !tower_writes_dx {
            ws.dx[..rows * d].fill(0.0);
        }
        if let Some(lin) = &self.lin {
            let dy = &ws.dlogit[..rows];
            lin.backward(p, g, &ws.dense, dy, InputGrad::Skip, rows, th);
        }
        // The deep tower, last layer first; `grads_a` carries d(output) downwards, already
        // through each hidden layer's ReLU (the layer above applies the mask as it writes it).
        let n = self.tower.len();
        if n > 0 {
            ws.grads_a[..rows].copy_from_slice(&ws.dlogit[..rows]);
            debug_assert!(!self.tower[n - 1].relu, "the logit layer has no ReLU");
            for i in (0..n).rev() {
                let l = self.tower[i];
                let inp: &[f32] = if i > 0 {
                    &ws.acts[i - 1]
                } else {
                    match kind {
                        ModelKind::Dcn => &ws.cross_out[self.cross.len() - 1],
                        ModelKind::Dlrm => &ws.top_in,
                        _ => &ws.x,
                    }
                };
                let dx = if i > 0 {
                    if self.tower[i - 1].relu {
                        InputGrad::ThroughRelu {
                            dx: &mut ws.grads_b,
                            below: &ws.acts[i - 1],
                        }
                    } else {
                        InputGrad::Plain(&mut ws.grads_b)
                    }
                } else if tower_writes_dx {
                    InputGrad::Plain(&mut ws.dx)
                } else {
                    InputGrad::Plain(&mut ws.grads_b)
                };
                l.backward(p, g, inp, &ws.grads_a, dx, rows, th);
                if i > 0 || !tower_writes_dx {
                    std::mem::swap(&mut ws.grads_a, &mut ws.grads_b);
                }
            }
        }
        // `grads_a` now holds d(tower input), rows x tower_in.
        // (For W&D and DeepFM it is in `dx` already.)
        match kind {
            ModelKind::Lr | ModelKind::Wdl => {}
            ModelKind::Deepfm => {
                let (nf, e) = (self.shape.fields.len(), self.shape.fields[0]);
                let (x, dlogit) = (&ws.x, &ws.dlogit);
                layers::by_row_halves(th.share(), rows, &mut ws.dx, d, |r0, n, dx| {
                    layers::fm_backward(&x[r0 * d..], d, n, nf, e, &dlogit[r0..], dx);
                });
            }
            ModelKind::Dcn => {
                // dx accumulates d/dx0 from every layer; the chain through x_l ends at x0 too.
                let mut dcur = std::mem::take(&mut ws.grads_a);
                let mut dnext = std::mem::take(&mut ws.grads_b);
                let mut scratch = vec![0f32; rows * d];
                for i in (0..self.cross.len()).rev() {
                    let xl: &[f32] = if i == 0 { &ws.x } else { &ws.cross_out[i - 1] };
                    self.cross[i].backward(
                        p,
                        g,
                        &ws.x,
                        xl,
                        &ws.cross_u[i],
                        &dcur,
                        &mut ws.dx,
                        &mut dnext,
                        &mut scratch,
                        rows,
                        th,
                    );
                    std::mem::swap(&mut dcur, &mut dnext);
                }
                for (a, b) in ws.dx[..rows * d].iter_mut().zip(&dcur) {
                    *a += b;
                }
                ws.grads_a = dcur;
                ws.grads_b = dnext;
            }
            ModelKind::Dlrm => {
                let (nf, e) = (self.shape.fields.len(), self.shape.fields[0]);
                let nz = nf + 1;
                let t = layers::dot_pairs(nz);
                let ti = e + t;
                // Split d(top input) into d(bottom out) and d(dots).
                let mut ddots = vec![0f32; rows * t];
                let mut dbo = vec![0f32; rows * e];
                for r in 0..rows {
                    let src = &ws.grads_a[r * ti..(r + 1) * ti];
                    dbo[r * e..(r + 1) * e].copy_from_slice(&src[..e]);
                    ddots[r * t..(r + 1) * t].copy_from_slice(&src[e..]);
                }
                layers::dot_backward(&ws.z, rows, nz, e, &ddots, &mut ws.dz);
                for r in 0..rows {
                    let dzr = &ws.dz[r * nz * e..(r + 1) * nz * e];
                    for k in 0..e {
                        dbo[r * e + k] += dzr[k];
                    }
                    ws.dx[r * d..r * d + nf * e].copy_from_slice(&dzr[e..]);
                }
                // The bottom MLP, last layer first. Its gradient comes from outside, so its
                // last ReLU is applied here; each layer masks for the one below as it goes.
                let nb = self.bottom.len();
                ws.grads_a[..rows * e].copy_from_slice(&dbo);
                if self.bottom[nb - 1].relu {
                    layers::relu_backward(&mut ws.grads_a[..rows * e], &ws.bottom[nb - 1], e);
                }
                for i in (0..nb).rev() {
                    let l = self.bottom[i];
                    let inp: &[f32] = if i > 0 { &ws.bottom[i - 1] } else { &ws.dense };
                    let dx = match i {
                        0 => InputGrad::Skip,
                        _ if self.bottom[i - 1].relu => InputGrad::ThroughRelu {
                            dx: &mut ws.grads_b,
                            below: &ws.bottom[i - 1],
                        },
                        _ => InputGrad::Plain(&mut ws.grads_b),
                    };
                    l.backward(p, g, inp, &ws.grads_a, dx, rows, th);
                    std::mem::swap(&mut ws.grads_a, &mut ws.grads_b);
                }
            }
        }
    }

    /// The gradient of the summed loss over all parameters after a `train_step` (for tests).
    #[cfg(test)]
    fn grads(&self) -> &[f32] {
        &self.grads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Xoshiro256;

    fn shape() -> InputShape {
        InputShape {
            fields: vec![3, 3, 3],
            dense: 2,
        }
    }

    /// A batch's input columns in [-1, 1) and wide sums in [-0.5, 0.5), in that draw order.
    fn random_inputs(rng: &mut Xoshiro256, rows: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..rows * d).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        let wide = (0..rows).map(|_| rng.next_f32() - 0.5).collect();
        (x, wide)
    }

    /// Loss of the batch at the given parameters and inputs, without updating anything.
    fn loss_at(
        net: &mut DenseNet,
        x: &[f32],
        wide: &[f32],
        y: &[f32],
        w: &[f32],
        th: &Threads,
    ) -> f64 {
        let rows = y.len();
        let (xi, wi) = net.inputs_mut(rows);
        xi.copy_from_slice(x);
        wi.copy_from_slice(wide);
        net.forward(rows, th);
        let logits = net.ws.logit[..rows].to_vec();
        let (mut p, mut d) = (vec![0f32; rows], vec![0f32; rows]);
        layers::bce_with_logits(&logits, y, w, 1.0 / rows as f32, &mut p, &mut d) / rows as f64
    }

    /// Whole-model finite differences: every parameter (sampled), every input column and every
    /// wide sum, for each model kind. SGD with lr -> 0 would still move the weights, so the
    /// analytic gradient is read before the update by using a zero-lr-like check: we compare
    /// against the gradients the step computed, from the parameters it started with.
    #[test]
    fn every_model_matches_finite_differences() {
        let seed = crate::testkit::seed("fd_models");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let th = Threads::new(1).unwrap();
        let rows = 4;
        for kind in [
            ModelKind::Lr,
            ModelKind::Wdl,
            ModelKind::Deepfm,
            ModelKind::Dcn,
            ModelKind::Dlrm,
        ] {
            let mut cfg = ModelConfig::new(kind);
            cfg.hidden = Some(vec![5, 4]);
            cfg.bottom = vec![4];
            cfg.cross_layers = 2;
            cfg.seed = seed;
            cfg.optimizer = DenseOptimizerConfig::Sgd { lr: 1e-30 };
            let mut sh = shape();
            if kind == ModelKind::Lr {
                sh.fields = vec![0, 0, 0];
            }
            let mut net = DenseNet::new(cfg, sh.clone()).unwrap();
            let d = sh.input_dim();
            let (x, wide) = random_inputs(&mut rng, rows, d);
            let y: Vec<f32> = (0..rows).map(|i| (i % 2) as f32).collect();
            let w = vec![1.0f32; rows];
            let (xi, wi) = net.inputs_mut(rows);
            xi.copy_from_slice(&x);
            wi.copy_from_slice(&wide);
            net.train_step(rows, &y, &w, &th);
            let g = net.grads().to_vec();
            // The input gradients are of the summed loss, the parameters' of the mean.
            let (dx, dwide) = {
                let (a, b) = net.input_grads(rows);
                let mean = |v: &[f32]| v.iter().map(|g| g / rows as f32).collect::<Vec<_>>();
                (mean(a), mean(b))
            };
            let h = 1e-3f32;
            let tol = |a: f64, n: f64| 1e-3 + 2e-2 * a.abs().max(n.abs());
            // ReLU makes the loss piecewise smooth. Where no kink lies within `h`, the analytic
            // gradient must match the central difference at `h` (or, when a kink lies between
            // `h/4` and `h`, the one at `h/4`). Where a kink lies right at the point, the
            // analytic value must be one of the one-sided slopes (between left and right, up
            // to the tolerance). A wrong gradient matches none of these at a smooth point.
            let check = |what: String, a: f64, loss: &mut dyn FnMut(f32) -> f64| {
                let q = h / 4.0;
                let (up, down) = (loss(h), loss(-h));
                let (up_q, mid, down_q) = (loss(q), loss(0.0), loss(-q));
                let num = (up - down) / (2.0 * f64::from(h));
                let fine = (up_q - down_q) / (2.0 * f64::from(q));
                let (right, left) = ((up_q - mid) / f64::from(q), (mid - down_q) / f64::from(q));
                let (lo, hi) = (left.min(right), left.max(right));
                let ok = (num - a).abs() <= tol(a, num)
                    || (fine - a).abs() <= tol(a, fine)
                    || (a >= lo - tol(a, lo) && a <= hi + tol(a, hi));
                assert!(
                    ok,
                    "{kind:?} {what}: analytic {a}, central {num} (h) {fine} (h/4), one-sided \
                     {left}..{right}, seed {seed}"
                );
            };
            // Parameters: a sample of them (all for small models).
            let stride = (net.param_count() / 200).max(1);
            for i in (0..net.param_count()).step_by(stride) {
                let orig = net.params[i];
                check(format!("param {i}"), f64::from(g[i]), &mut |delta| {
                    net.params[i] = orig + delta;
                    let l = loss_at(&mut net, &x, &wide, &y, &w, &th);
                    net.params[i] = orig;
                    l
                });
            }
            // Embedding columns of x (dense columns are not back-propagated).
            let emb: usize = sh.fields.iter().sum();
            for r in 0..rows {
                for c in 0..emb {
                    check(
                        format!("x[{r},{c}]"),
                        f64::from(dx[r * d + c]),
                        &mut |delta| {
                            let mut xp = x.clone();
                            xp[r * d + c] += delta;
                            loss_at(&mut net, &xp, &wide, &y, &w, &th)
                        },
                    );
                }
                if kind.has_wide() {
                    check(format!("wide[{r}]"), f64::from(dwide[r]), &mut |delta| {
                        let mut wp = wide.clone();
                        wp[r] += delta;
                        loss_at(&mut net, &x, &wp, &y, &w, &th)
                    });
                }
            }
        }
        println!("seed {seed}");
    }

    /// On two threads a layer runs its row blocks, and its weight and input gradients, side
    /// by side (`Share::halves`). That must compute the step one thread computes (up to the
    /// GEMMs' summation order) and the same bits every time. 300 rows split unevenly (160 +
    /// 140), and hidden sizes off the kernel's tile catch a block written to the wrong rows.
    #[test]
    fn two_threads_compute_the_one_thread_step() {
        let seed = crate::testkit::seed("split_threads");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let (one, two) = (Threads::new(1).unwrap(), Threads::new(2).unwrap());
        let rows = 300;
        for kind in [
            ModelKind::Wdl,
            ModelKind::Deepfm,
            ModelKind::Dcn,
            ModelKind::Dlrm,
        ] {
            let mut cfg = ModelConfig::new(kind);
            cfg.hidden = Some(vec![37, 20]);
            cfg.bottom = vec![3];
            cfg.seed = seed;
            let sh = shape();
            let d = sh.input_dim();
            let (x, wide) = random_inputs(&mut rng, rows, d);
            let y: Vec<f32> = (0..rows).map(|i| f32::from(u8::from(i % 3 == 0))).collect();
            let w = vec![1.0f32; rows];
            let step = |th: &Threads| {
                let mut net = DenseNet::new(cfg.clone(), sh.clone()).unwrap();
                let (xi, wi) = net.inputs_mut(rows);
                xi.copy_from_slice(&x);
                wi.copy_from_slice(&wide);
                let loss = th.install(|| net.train_step(rows, &y, &w, th)).loss_sum;
                let (dx, _) = net.input_grads(rows);
                (
                    loss,
                    net.grads().to_vec(),
                    dx.to_vec(),
                    net.params().to_vec(),
                )
            };
            let (l1, g1, dx1, p1) = step(&one);
            let (l2, g2, dx2, p2) = step(&two);
            assert_eq!(
                step(&two),
                (l2, g2.clone(), dx2.clone(), p2.clone()),
                "{kind:?}: two threads, same bits twice (seed {seed})"
            );
            assert!(
                (l1 - l2).abs() <= 1e-9 * l1.abs().max(1.0),
                "{kind:?}: {l1} vs {l2}"
            );
            for (what, a, b) in [
                ("grads", &g1, &g2),
                ("dx", &dx1, &dx2),
                ("params", &p1, &p2),
            ] {
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                for (i, (u, v)) in a.iter().zip(b.iter()).enumerate() {
                    assert!(
                        (u - v).abs() <= 1e-4 * scale,
                        "{kind:?} {what}[{i}]: one thread {u}, two threads {v} (seed {seed})"
                    );
                }
            }
        }
    }

    #[test]
    fn state_round_trips() {
        let mut net = DenseNet::new(ModelConfig::new(ModelKind::Deepfm), shape()).unwrap();
        let th = Threads::new(1).unwrap();
        let (x, _) = net.inputs_mut(2);
        x.fill(0.3);
        net.train_step(2, &[1.0, 0.0], &[1.0, 1.0], &th);
        let s = net.state();
        let bytes = rmp_serde::to_vec(&s).unwrap();
        let back: DenseState = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, s);
        let net2 = DenseNet::from_state(back).unwrap();
        assert_eq!(net2.params(), net.params());
        let mut other = s.clone();
        other.params.pop();
        assert!(DenseNet::from_state(other).is_err());

        // From the weights alone: the same forward pass; weights of another size refused.
        let mut scorer =
            DenseNet::from_weights(s.config.clone(), s.shape.clone(), s.params.clone()).unwrap();
        let mut full = DenseNet::from_state(s.clone()).unwrap();
        for n in [&mut scorer, &mut full] {
            let (x, _) = n.inputs_mut(2);
            x.fill(-0.7);
            n.forward(2, &th);
        }
        assert_eq!(scorer.predictions(2), full.predictions(2));
        let short = s.params[1..].to_vec();
        let e = DenseNet::from_weights(s.config.clone(), s.shape.clone(), short).unwrap_err();
        assert!(e.to_string().contains("parameters"), "{e}");
    }

    #[test]
    fn refuses_unequal_dims_for_interaction_models() {
        let sh = InputShape {
            fields: vec![4, 8],
            dense: 1,
        };
        let e = DenseNet::new(ModelConfig::new(ModelKind::Deepfm), sh.clone()).unwrap_err();
        assert!(e.to_string().contains("one dim for every field"), "{e}");
        DenseNet::new(ModelConfig::new(ModelKind::Wdl), sh).unwrap();
    }
}
