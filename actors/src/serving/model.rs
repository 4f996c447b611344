//! The model a serving replica answers from: read-only tables of weights (no optimizer state,
//! no admission, no eviction), the dense net, and the manifest of the version they form.
//!
//! A serving model never inserts a key: an unknown key reads as its table's default row, as a
//! plain lookup on the shards does. It scores through [`crate::scorer::Scorer`], the forward
//! pass alone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ahash::AHashMap;
use serde::{Deserialize, Serialize};

use crate::ckpt::{Manifest, Restored};
use crate::dense::{DenseNet, DenseUpdate, InputShape, ModelConfig, Threads};
use crate::embedding::{RowBlock, ShardDelta, TableConfig};
use crate::ids::TableName;
use crate::sample::json::{RawField, RawSample, SampleDecoder};
use crate::sample::SampleBlock;
use crate::scorer::Scorer;

use super::ServingError;

/// One table's weights: `dim` floats per key, in one contiguous block.
#[derive(Clone, Debug)]
pub struct ServingTable {
    dim: usize,
    default_value: f32,
    index: AHashMap<u64, u32>,
    data: Vec<f32>,
    /// Slots of deleted keys, reused by the next insert.
    free: Vec<u32>,
}

impl ServingTable {
    fn new(cfg: &TableConfig) -> Self {
        Self {
            dim: cfg.dim,
            default_value: cfg.default_value,
            index: AHashMap::new(),
            data: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Sets `key`'s weights to the first `dim` floats of `row` (weights come before the
    /// optimizer state in a checkpoint row).
    fn upsert(&mut self, key: u64, row: &[f32]) {
        let slot = match self.index.get(&key) {
            Some(&slot) => slot,
            None => {
                let slot = self.free.pop().unwrap_or_else(|| {
                    let slot = (self.data.len() / self.dim.max(1)) as u32;
                    self.data.resize(self.data.len() + self.dim, 0.0);
                    slot
                });
                self.index.insert(key, slot);
                slot
            }
        };
        let at = slot as usize * self.dim;
        self.data[at..at + self.dim].copy_from_slice(&row[..self.dim]);
    }

    /// Checks a block of checkpoint rows before any of it is applied: consistent columns,
    /// finite values, and at least `dim` floats per row.
    fn check_rows(
        &self,
        table: &TableName,
        rows: &RowBlock,
        rf: usize,
    ) -> Result<(), ServingError> {
        rows.check(rf)
            .map_err(|e| ServingError::Model(e.to_string()))?;
        if rf < self.dim {
            return Err(ServingError::Model(format!(
                "table {table} has rows of {rf} floats, fewer than its dim {}",
                self.dim
            )));
        }
        Ok(())
    }

    fn remove(&mut self, key: u64) {
        if let Some(slot) = self.index.remove(&key) {
            self.free.push(slot);
        }
    }

    /// Appends `dim` floats per key to `out`: the key's weights, or the default row.
    pub fn lookup(&self, keys: &[u64], out: &mut Vec<f32>) {
        out.reserve(keys.len() * self.dim);
        for k in keys {
            match self.index.get(k) {
                Some(&slot) => {
                    let at = slot as usize * self.dim;
                    out.extend_from_slice(&self.data[at..at + self.dim]);
                }
                None => out.extend(std::iter::repeat_n(self.default_value, self.dim)),
            }
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The weights of `key`, if it has a row.
    pub fn get(&self, key: u64) -> Option<&[f32]> {
        let at = *self.index.get(&key)? as usize * self.dim;
        Some(&self.data[at..at + self.dim])
    }
}

/// A published delta in the form a replica applies: read and checked from the store once,
/// then applied to each copy of the model.
#[derive(Debug)]
pub struct ModelDelta {
    pub manifest: Manifest,
    /// The dense state, whole or as a diff from the parent's (the served one).
    pub dense: DenseUpdate,
    pub shards: Vec<ShardDelta>,
}

/// One user and context, scored against a list of candidates.
///
/// `dense` and `sparse` hold the features shared by every candidate (the user's and the
/// context's); each candidate adds its own. A field may be given once per candidate: either
/// shared or in the candidate, not both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    #[serde(default)]
    pub dense: BTreeMap<String, f64>,
    #[serde(default)]
    pub sparse: BTreeMap<String, RawField>,
    pub candidates: Vec<Candidate>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    #[serde(default)]
    pub dense: BTreeMap<String, f64>,
    #[serde(default)]
    pub sparse: BTreeMap<String, RawField>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictResponse {
    /// The model version that produced every score.
    pub version: u64,
    /// Click probability per candidate, in request order.
    pub scores: Vec<f32>,
}

/// What serving keeps of a version's dense state: its weights. The optimizer's moments and a
/// pending gradient never score a request, so serving neither keeps nor decodes them (two
/// thirds of a delta's dense floats). Shared by the cell's two copies of one version.
#[derive(Debug)]
pub struct DenseWeights {
    pub config: ModelConfig,
    pub shape: InputShape,
    pub params: Vec<f32>,
}

impl DenseWeights {
    /// A net that scores with these weights.
    pub fn net(&self) -> anyhow::Result<DenseNet> {
        DenseNet::from_weights(self.config.clone(), self.shape.clone(), self.params.clone())
    }
}

/// A version's whole model, read-only to predictions.
#[derive(Debug)]
pub struct ServingModel {
    manifest: Manifest,
    weights: Arc<DenseWeights>,
    tables: BTreeMap<TableName, ServingTable>,
    decoder: SampleDecoder,
    /// Scorers (the forward pass with its scratch) built for this version's dense weights,
    /// reused across requests; emptied whenever the weights change.
    predictors: Mutex<Vec<Scorer>>,
}

impl Clone for ServingModel {
    fn clone(&self) -> Self {
        Self {
            manifest: self.manifest.clone(),
            weights: self.weights.clone(),
            tables: self.tables.clone(),
            decoder: SampleDecoder::new(&self.manifest.schema),
            predictors: Mutex::new(Vec::new()),
        }
    }
}

impl ServingModel {
    /// The serving form of a restored version: weights only.
    pub fn from_restored(r: Restored) -> Result<Self, ServingError> {
        let mut tables: BTreeMap<TableName, ServingTable> = r
            .manifest
            .tables
            .iter()
            .map(|(name, cfg)| (TableName::new(name), ServingTable::new(cfg)))
            .collect();
        for shard in &r.shards {
            for ts in &shard.tables {
                let t = tables
                    .get_mut(&ts.name)
                    .ok_or_else(|| ServingError::Model(format!("unknown table {}", ts.name)))?;
                let rf = ts.row_floats as usize;
                t.check_rows(&ts.name, &ts.rows, rf)?;
                t.index.reserve(ts.rows.len());
                t.data.reserve(ts.rows.len() * t.dim);
                for i in 0..ts.rows.len() {
                    t.upsert(ts.rows.keys[i], ts.rows.row(i, rf));
                }
            }
        }
        let weights = Arc::new(DenseWeights {
            config: r.dense.config,
            shape: r.dense.shape,
            params: r.dense.params,
        });
        // The dense net must fit the schema before any request reaches it.
        predictor(&r.manifest, &weights)?;
        Ok(Self {
            decoder: SampleDecoder::new(&r.manifest.schema),
            manifest: r.manifest,
            weights,
            tables,
            predictors: Mutex::new(Vec::new()),
        })
    }

    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The dense network's weights (its shape and config size the scoring work).
    pub fn weights(&self) -> &DenseWeights {
        &self.weights
    }

    pub(crate) fn weights_arc(&self) -> Arc<DenseWeights> {
        self.weights.clone()
    }

    pub fn table(&self, name: &TableName) -> Option<&ServingTable> {
        self.tables.get(name)
    }

    /// Rows held across all tables.
    pub fn rows(&self) -> usize {
        self.tables.values().map(ServingTable::len).sum()
    }

    /// Brings this model forward by one delta, whose parent must be this version. On error
    /// the model may be half-updated and must be discarded (the cell does).
    pub fn apply(&mut self, d: &ModelDelta) -> Result<(), ServingError> {
        self.apply_with(d, None)
    }

    /// As [`ServingModel::apply`], given the weights `d` leads to when another copy decoded
    /// them already (the cell's active copy, at `d`'s version): a delta's dense diff is then
    /// decoded once for both copies.
    pub(crate) fn apply_with(
        &mut self,
        d: &ModelDelta,
        decoded: Option<Arc<DenseWeights>>,
    ) -> Result<(), ServingError> {
        if d.manifest.parent != Some(self.version()) {
            return Err(ServingError::Chain {
                have: self.version(),
                got: d.manifest.version,
                parent: d.manifest.parent,
            });
        }
        // Decoded before any row changes: a diff that does not apply leaves the model whole.
        let weights = match decoded {
            Some(w) => w,
            None => {
                let params = (d.dense.params_after(&self.weights.params)).map_err(|e| {
                    ServingError::Model(format!("version {}: {e}", d.manifest.version))
                })?;
                let (config, shape) = d.dense.config_and_shape();
                Arc::new(DenseWeights {
                    config: config.clone(),
                    shape: shape.clone(),
                    params,
                })
            }
        };
        for shard in &d.shards {
            for td in &shard.tables {
                let t = self
                    .tables
                    .get_mut(&td.name)
                    .ok_or_else(|| ServingError::Model(format!("unknown table {}", td.name)))?;
                let rf = td.row_floats as usize;
                t.check_rows(&td.name, &td.upserts, rf)?;
                // As a restore merges: deletions first, then this delta's rows.
                for &k in &td.tombstones {
                    t.remove(k);
                }
                for i in 0..td.upserts.len() {
                    t.upsert(td.upserts.keys[i], td.upserts.row(i, rf));
                }
            }
        }
        self.weights = weights;
        self.manifest = d.manifest.clone();
        self.predictors
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    /// Scores every candidate of `req`, with at most `max_candidates` of them.
    pub fn predict(
        &self,
        req: &PredictRequest,
        max_candidates: usize,
        threads: &Threads,
    ) -> Result<PredictResponse, ServingError> {
        if req.candidates.is_empty() {
            return Err(ServingError::BadRequest("no candidates".into()));
        }
        if req.candidates.len() > max_candidates {
            return Err(ServingError::BadRequest(format!(
                "{} candidates, at most {max_candidates} per request",
                req.candidates.len()
            )));
        }
        let block = self.samples(req)?;
        let scores = self.score_block(&block, threads)?;
        Ok(PredictResponse {
            version: self.version(),
            scores,
        })
    }

    /// Scores every row of `block` (built for this version's schema) with this version.
    pub fn score_block(
        &self,
        block: &SampleBlock,
        threads: &Threads,
    ) -> Result<Vec<f32>, ServingError> {
        let pooled = match self.predictors.lock() {
            Ok(mut pool) => pool.pop(),
            Err(p) => p.into_inner().pop(),
        };
        let mut p = match pooled {
            Some(p) => p,
            None => predictor(&self.manifest, &self.weights)?,
        };
        let scores = p
            .predict_with(block, 0..block.len(), threads, |name, dim, keys, out| {
                let t = self
                    .tables
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("the model has no table {name}"))?;
                anyhow::ensure!(t.dim == dim, "table {name} has dim {}, not {dim}", t.dim);
                t.lookup(keys, out);
                Ok(())
            })
            .map_err(|e| ServingError::Model(format!("{e:#}")))?;
        match self.predictors.lock() {
            Ok(mut pool) => pool.push(p),
            Err(pool) => pool.into_inner().push(p),
        }
        Ok(scores)
    }

    /// One sample per candidate: the shared features plus the candidate's own.
    fn samples(&self, req: &PredictRequest) -> Result<SampleBlock, ServingError> {
        let schema = self.decoder.schema();
        let labels: BTreeMap<String, f64> =
            schema.labels.iter().map(|l| (l.clone(), 0.0)).collect();
        let mut block = SampleBlock::for_schema(schema);
        for (i, c) in req.candidates.iter().enumerate() {
            let mut raw = RawSample {
                labels: labels.clone(),
                dense: req.dense.clone(),
                sparse: req.sparse.clone(),
                weight: None,
            };
            for (k, v) in &c.dense {
                if raw.dense.insert(k.clone(), *v).is_some() {
                    return Err(ServingError::BadRequest(format!(
                        "candidate {i}: dense feature {k} is also given for the whole request"
                    )));
                }
            }
            for (k, v) in &c.sparse {
                if raw.sparse.insert(k.clone(), v.clone()).is_some() {
                    return Err(ServingError::BadRequest(format!(
                        "candidate {i}: field {k} is also given for the whole request"
                    )));
                }
            }
            self.decoder
                .push(&raw, &mut block)
                .map_err(|e| ServingError::BadRequest(format!("candidate {i}: {e}")))?;
        }
        Ok(block)
    }
}

/// A scorer around `weights`.
fn predictor(manifest: &Manifest, weights: &DenseWeights) -> Result<Scorer, ServingError> {
    let net = weights
        .net()
        .map_err(|e| ServingError::Model(e.to_string()))?;
    Scorer::with_net(manifest.schema.clone(), net).map_err(|e| ServingError::Model(e.to_string()))
}
