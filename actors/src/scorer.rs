//! The forward-only path of a model: gather a batch's keys, pool their embedding rows into the
//! model input, run the dense net forward, predict. Serving holds scorers; the training step
//! ([`crate::training::Trainer`]) wraps one and adds the backward pass, the updates and the
//! gradient push.
//!
//! A table row holds a field's embedding followed, for models with a wide part, by the id's
//! wide weight: one lookup fetches both.

use std::ops::Range;

use ahash::AHashMap;
use anyhow::Context;

use crate::dense::layers::pool_forward;
use crate::dense::{DenseNet, InputShape, ModelConfig, Threads};
use crate::embedding::TableConfig;
use crate::ids::{FeatureId, TableName};
use crate::sample::{Pooling, SampleBlock, Schema};
use crate::shard::{ShardPlan, ShardRouter};

/// One embedding table as the scorer reads it.
#[derive(Clone, Debug)]
pub(crate) struct TableUse {
    pub(crate) name: TableName,
    /// Embedding columns (0 for LR) plus the wide column when the model has one.
    pub(crate) row_dim: usize,
    pub(crate) emb_dim: usize,
    /// Fields stored in this table, in schema order.
    pub(crate) fields: Vec<usize>,
}

/// Per-step scratch of one table: unique keys and where each id occurrence points.
#[derive(Debug, Default)]
pub(crate) struct TableBatch {
    pub(crate) keys: Vec<FeatureId>,
    pub(crate) slot: AHashMap<FeatureId, u32>,
    pub(crate) index: Vec<u32>,
    pub(crate) weights: Vec<f32>,
    /// Per field of the table, per row: the range of that row's ids in `index`.
    pub(crate) spans: Vec<Vec<(u32, u32)>>,
    /// Which shard owns each of `keys`: made once, used by the lookup and the push.
    pub(crate) plan: ShardPlan,
    pub(crate) rows: Vec<f32>,
    pub(crate) grads: Vec<f32>,
}

/// One batch as the step needs it before any shard answers: its keys deduplicated and planned
/// per table, its labels and sample weights.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    pub(crate) tables: Vec<TableBatch>,
    pub(crate) labels: Vec<f32>,
    pub(crate) weights: Vec<f32>,
}

/// A model's forward pass over one version's dense net, with its scratch: how the schema maps
/// to tables and model inputs, and the batch being scored.
#[derive(Debug)]
pub struct Scorer {
    schema: Schema,
    net: DenseNet,
    pub(crate) tables: Vec<TableUse>,
    /// Per field: (table index, column offset of its embedding in the model input).
    field_at: Vec<(usize, usize)>,
    /// The batch under way.
    pub(crate) cur: Gathered,
    wide_tmp: Vec<f32>,
}

impl Scorer {
    /// The tables (name and row dim) this schema and model need from the shards.
    pub fn required_tables(schema: &Schema, model: &ModelConfig) -> Vec<(String, usize)> {
        schema
            .tables()
            .into_iter()
            .map(|(name, dim)| (name, Self::row_dim(model, dim)))
            .collect()
    }

    /// Checks that `tables` (a manifest's, say) give every row this schema and model read,
    /// at the right dim, before any lookup slices them.
    pub fn check_tables(
        schema: &Schema,
        model: &ModelConfig,
        tables: &std::collections::BTreeMap<String, TableConfig>,
    ) -> anyhow::Result<()> {
        for (name, dim) in Self::required_tables(schema, model) {
            match tables.get(&name) {
                Some(c) if c.dim == dim => {}
                Some(c) => anyhow::bail!(
                    "it has table {name} with dim {}, but the {} model reads rows of {dim}",
                    c.dim,
                    model.kind.name()
                ),
                None => anyhow::bail!("it lacks table {name}"),
            }
        }
        Ok(())
    }

    fn row_dim(model: &ModelConfig, emb_dim: usize) -> usize {
        let emb = if model.kind.has_embeddings() {
            emb_dim
        } else {
            0
        };
        emb + usize::from(model.kind.has_wide())
    }

    /// A scorer around a fresh dense net for `schema` and `model`.
    pub fn new(schema: Schema, model: ModelConfig) -> anyhow::Result<Self> {
        schema.validate("schema")?;
        let emb_of = |d: usize| if model.kind.has_embeddings() { d } else { 0 };
        let shape = InputShape {
            fields: schema.fields.iter().map(|f| emb_of(f.dim)).collect(),
            dense: schema.dense.len(),
        };
        let net = DenseNet::new(model, shape)?;
        Self::with_net(schema, net)
    }

    /// A scorer around an existing dense net (for example one loaded from a model store).
    pub fn with_net(schema: Schema, net: DenseNet) -> anyhow::Result<Self> {
        schema.validate("schema")?;
        let model = net.config().clone();
        let want: Vec<usize> = schema
            .fields
            .iter()
            .map(|f| {
                if model.kind.has_embeddings() {
                    f.dim
                } else {
                    0
                }
            })
            .collect();
        anyhow::ensure!(
            net.shape().fields == want && net.shape().dense == schema.dense.len(),
            "the model was built for {} fields with dims {:?} and {} dense features; \
             the schema has dims {:?} and {} dense features",
            net.shape().fields.len(),
            net.shape().fields,
            net.shape().dense,
            want,
            schema.dense.len()
        );
        let mut tables: Vec<TableUse> = Vec::new();
        let mut field_at = Vec::new();
        let mut col = 0;
        for (i, f) in schema.fields.iter().enumerate() {
            let t = match tables.iter().position(|t| t.name.as_str() == f.table) {
                Some(t) => t,
                None => {
                    tables.push(TableUse {
                        name: TableName::new(&f.table),
                        row_dim: Self::row_dim(&model, f.dim),
                        emb_dim: want[i],
                        fields: Vec::new(),
                    });
                    tables.len() - 1
                }
            };
            tables[t].fields.push(i);
            field_at.push((t, col));
            col += want[i];
        }
        let cur = Gathered::for_tables(&tables);
        Ok(Self {
            cur,
            schema,
            net,
            tables,
            field_at,
            wide_tmp: Vec::new(),
        })
    }

    pub fn net(&self) -> &DenseNet {
        &self.net
    }

    pub fn into_net(self) -> DenseNet {
        self.net
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The tables this scorer reads, with the row dim it reads from each.
    pub fn table_dims(&self) -> impl Iterator<Item = (&TableName, usize)> + '_ {
        self.tables.iter().map(|t| (&t.name, t.row_dim))
    }

    /// Click probabilities for rows `range` of `block`, with rows from the shard owners'
    /// plain lookups: nothing is admitted, created or updated (unknown keys read as the
    /// table's default row).
    pub async fn predict_batch(
        &mut self,
        block: &SampleBlock,
        range: Range<usize>,
        router: &ShardRouter,
        threads: &Threads,
    ) -> anyhow::Result<Vec<f32>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        self.cur.gather(&self.tables, block, &range);
        for (t, tb) in self.tables.iter().zip(&mut self.cur.tables) {
            tb.rows = router
                .lookup(&t.name, t.row_dim, &tb.keys)
                .await
                .with_context(|| format!("looking up table {}", t.name))?;
        }
        Ok(self.forward_gathered(block, &range, threads))
    }

    /// [`Scorer::predict_batch`] with rows from a local, synchronous source (a serving
    /// replica's read-only tables): `lookup(table, row_dim, unique_keys, out)` fills `out`
    /// with `row_dim` floats per key.
    pub fn predict_with(
        &mut self,
        block: &SampleBlock,
        range: Range<usize>,
        threads: &Threads,
        mut lookup: impl FnMut(&TableName, usize, &[u64], &mut Vec<f32>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<f32>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        self.cur.gather(&self.tables, block, &range);
        for (t, tb) in self.tables.iter().zip(&mut self.cur.tables) {
            tb.rows.clear();
            lookup(&t.name, t.row_dim, &tb.keys, &mut tb.rows)
                .with_context(|| format!("looking up table {}", t.name))?;
            anyhow::ensure!(
                tb.rows.len() == tb.keys.len() * t.row_dim,
                "table {} gave {} floats for {} keys of {}",
                t.name,
                tb.rows.len(),
                tb.keys.len(),
                t.row_dim
            );
        }
        Ok(self.forward_gathered(block, &range, threads))
    }

    fn forward_gathered(
        &mut self,
        block: &SampleBlock,
        range: &Range<usize>,
        threads: &Threads,
    ) -> Vec<f32> {
        let rows = range.len();
        self.on_dense_threads(block, range, threads, |net, _, _| {
            net.forward(rows, threads)
        });
        self.net.predictions(rows).to_vec()
    }

    /// Fills the model input of rows `range` of `block` from the rows in `cur.tables[t].rows`
    /// (the pooling), then runs `then`, all on the dense threads.
    ///
    /// Why one hand-off: waking the dense threads and waking this one again costs time each
    /// time (`docs/design-notes.md`), and the pooling on either side of the dense step would
    /// otherwise run on this thread while both dense threads wait.
    pub(crate) fn on_dense_threads<R: Send>(
        &mut self,
        block: &SampleBlock,
        range: &Range<usize>,
        threads: &Threads,
        then: impl FnOnce(&mut DenseNet, &mut Gathered, Fields<'_>) -> R + Send,
    ) -> R {
        let rows = range.len();
        let Self {
            schema,
            net,
            tables,
            field_at,
            cur,
            wide_tmp,
        } = self;
        let fields = Fields {
            schema,
            tables,
            field_at,
        };
        let (has_wide, d, dense) = (
            net.config().kind.has_wide(),
            net.shape().input_dim(),
            net.shape().dense,
        );
        wide_tmp.resize(rows, 0.0);
        let tmp = &mut wide_tmp[..rows];
        threads.install(|| {
            let (x, wide) = net.inputs_mut(rows);
            let pool = Pool {
                fields,
                batch: cur,
                has_wide,
                d,
                dense,
            };
            pool.fill(block, range.start, threads, x, wide, tmp);
            then(net, cur, fields)
        })
    }
}

impl Gathered {
    /// Empty scratch for each of `tables`.
    pub(crate) fn for_tables(tables: &[TableUse]) -> Self {
        Self {
            tables: tables.iter().map(|_| TableBatch::default()).collect(),
            ..Default::default()
        }
    }

    /// Dedupes each table's keys (first-occurrence order, so a step is deterministic) and
    /// records where every id occurrence points.
    pub(crate) fn gather(
        &mut self,
        tables: &[TableUse],
        block: &SampleBlock,
        range: &Range<usize>,
    ) {
        for (t, tb) in tables.iter().zip(&mut self.tables) {
            tb.keys.clear();
            tb.slot.clear();
            tb.index.clear();
            tb.weights.clear();
            tb.spans.resize(t.fields.len(), Vec::new());
            for (k, &f) in t.fields.iter().enumerate() {
                let spans = &mut tb.spans[k];
                spans.clear();
                for r in range.clone() {
                    let (ids, ws) = block.row(r).field(f);
                    let a = tb.index.len() as u32;
                    for (&id, &w) in ids.iter().zip(ws) {
                        let next = tb.keys.len() as u32;
                        let s = *tb.slot.entry(id).or_insert_with(|| {
                            tb.keys.push(id);
                            next
                        });
                        tb.index.push(s);
                        tb.weights.push(w);
                    }
                    spans.push((a, tb.index.len() as u32));
                }
            }
        }
        self.labels.clear();
        self.weights.clear();
        for r in range.clone() {
            let s = block.row(r);
            self.labels.push(s.label());
            self.weights.push(s.weight());
        }
    }

    /// Whether this is what [`Gathered::gather`] makes of rows `range` of `block`: one pass
    /// over the rows without hashing, a small fraction of a gather. A batch gathered ahead is
    /// checked before it is used, so a caller that names the wrong rows, or a block that
    /// changed in between, costs a second gather, never a step on the wrong keys.
    pub(crate) fn matches(
        &self,
        tables: &[TableUse],
        block: &SampleBlock,
        range: &Range<usize>,
    ) -> bool {
        if self.labels.len() != range.len() || self.weights.len() != range.len() {
            return false;
        }
        for (i, r) in range.clone().enumerate() {
            let s = block.row(r);
            if self.labels[i].to_bits() != s.label().to_bits()
                || self.weights[i].to_bits() != s.weight().to_bits()
            {
                return false;
            }
        }
        for (t, tb) in tables.iter().zip(&self.tables) {
            for (k, &f) in t.fields.iter().enumerate() {
                let Some(spans) = tb.spans.get(k).filter(|sp| sp.len() == range.len()) else {
                    return false;
                };
                for (r, &(a, b)) in range.clone().zip(spans) {
                    let (ids, ws) = block.row(r).field(f);
                    let (a, b) = (a as usize, b as usize);
                    if b - a != ids.len() {
                        return false;
                    }
                    for ((&id, &w), (&s, &gw)) in ids
                        .iter()
                        .zip(ws)
                        .zip(tb.index[a..b].iter().zip(&tb.weights[a..b]))
                    {
                        if tb.keys.get(s as usize) != Some(&id) || gw.to_bits() != w.to_bits() {
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    /// Which shard owns each key, for the lookup and later the push.
    pub(crate) fn plan(&mut self, router: &ShardRouter) {
        for tb in &mut self.tables {
            tb.plan = router.plan(&tb.keys);
        }
    }
}

/// Where to split a batch's rows between two dense threads, or `None` to keep them whole: one
/// thread, or too few rows for the hand-off to pay.
pub(crate) fn split_for(threads: &Threads, rows: usize) -> Option<usize> {
    (threads.share().halves().is_some() && rows >= 128).then_some(rows / 2)
}

/// The schema's fields: which table each is stored in and where it goes in the model input.
#[derive(Clone, Copy)]
pub(crate) struct Fields<'a> {
    pub(crate) schema: &'a Schema,
    pub(crate) tables: &'a [TableUse],
    pub(crate) field_at: &'a [(usize, usize)],
}

/// What the pooling's forward pass reads: the fields, and the batch's deduplicated keys with
/// their rows.
struct Pool<'a> {
    fields: Fields<'a>,
    batch: &'a Gathered,
    has_wide: bool,
    /// Floats per model input row, and how many of them (the last) are dense features.
    d: usize,
    dense: usize,
}

impl Pool<'_> {
    /// Fills the model input of the batch's rows (`wide.len()` of them, the first being row
    /// `first` of `block`): by row halves on two dense threads when there are two. Each row's
    /// inputs are computed by the same operations in the same order whichever half holds it,
    /// so the split changes no bit. Runs inside [`Threads::install`].
    fn fill(
        &self,
        block: &SampleBlock,
        first: usize,
        threads: &Threads,
        x: &mut [f32],
        wide: &mut [f32],
        tmp: &mut [f32],
    ) {
        match split_for(threads, wide.len()) {
            Some(h) => {
                let (x0, x1) = x.split_at_mut(h * self.d);
                let (w0, w1) = wide.split_at_mut(h);
                let (t0, t1) = tmp.split_at_mut(h);
                rayon::join(
                    || self.forward(block, first, 0, x0, w0, t0),
                    || self.forward(block, first, h, x1, w1, t1),
                );
            }
            None => self.forward(block, first, 0, x, wide, tmp),
        }
    }

    /// Fills the inputs of the batch's rows `lo..lo + wide.len()`: `x` and `wide` hold just
    /// those rows, `tmp` is scratch of the same length as `wide`. `first` is the batch's first
    /// row in `block`.
    fn forward(
        &self,
        block: &SampleBlock,
        first: usize,
        lo: usize,
        x: &mut [f32],
        wide: &mut [f32],
        tmp: &mut [f32],
    ) {
        let (n, d) = (wide.len(), self.d);
        wide.fill(0.0);
        let Fields {
            schema, field_at, ..
        } = self.fields;
        for (t, tb) in self.fields.tables.iter().zip(&self.batch.tables) {
            for (k, &f) in t.fields.iter().enumerate() {
                let mean = schema.fields[f].pooling == Pooling::Mean;
                let col = field_at[f].1;
                let spans = &tb.spans[k][lo..lo + n];
                if t.emb_dim > 0 {
                    let cols = 0..t.emb_dim;
                    let (index, weights) = (&tb.index, &tb.weights);
                    pool_forward(
                        &tb.rows,
                        t.row_dim,
                        cols,
                        index,
                        weights,
                        spans,
                        mean,
                        &mut x[col..],
                        d,
                    );
                }
                if self.has_wide {
                    let cols = t.emb_dim..t.emb_dim + 1;
                    pool_forward(
                        &tb.rows,
                        t.row_dim,
                        cols,
                        &tb.index,
                        &tb.weights,
                        spans,
                        mean,
                        tmp,
                        1,
                    );
                    for (w, v) in wide.iter_mut().zip(&*tmp) {
                        *w += v;
                    }
                }
            }
        }
        let emb_cols = d - self.dense;
        for i in 0..n {
            x[i * d + emb_cols..(i + 1) * d].copy_from_slice(block.row(first + lo + i).dense());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::dense::ModelKind;

    #[test]
    fn tables_that_do_not_give_the_rows_the_model_reads_are_refused() {
        let (schema, model) = (Schema::criteo(8), ModelConfig::new(ModelKind::Wdl));
        let mut tables: BTreeMap<String, TableConfig> = Scorer::required_tables(&schema, &model)
            .into_iter()
            .map(|(name, dim)| (name, TableConfig::with_dim(dim)))
            .collect();
        Scorer::check_tables(&schema, &model, &tables).unwrap();
        let (name, c) = tables.iter_mut().next().unwrap();
        let name = name.clone();
        c.dim += 1;
        let e = Scorer::check_tables(&schema, &model, &tables).unwrap_err();
        assert!(
            e.to_string().contains(&format!("table {name} with dim")),
            "{e}"
        );
        tables.remove(&name);
        let e = Scorer::check_tables(&schema, &model, &tables).unwrap_err();
        assert!(
            e.to_string().contains(&format!("lacks table {name}")),
            "{e}"
        );
    }
}
