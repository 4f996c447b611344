//! A columnar block of samples.

use serde::{Deserialize, Serialize};

use crate::ids::FeatureId;

/// Samples stored column-wise. Row `r`'s field `f` holds the ids
/// `ids[offsets[r * fields + f]..offsets[r * fields + f + 1]]`, with their weights at the same
/// positions of `id_weights`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleBlock {
    num_labels: usize,
    num_dense: usize,
    num_fields: usize,
    labels: Vec<f32>,
    dense: Vec<f32>,
    weights: Vec<f32>,
    ids: Vec<FeatureId>,
    id_weights: Vec<f32>,
    offsets: Vec<u32>,
}

/// Where a block stood before a row was started, so a row that fails half-way is undone.
#[derive(Clone, Copy, Debug)]
pub struct RowMark {
    labels: usize,
    dense: usize,
    ids: usize,
    offsets: usize,
}

impl SampleBlock {
    pub fn new(num_labels: usize, num_dense: usize, num_fields: usize) -> Self {
        Self {
            num_labels,
            num_dense,
            num_fields,
            offsets: vec![0],
            ..Default::default()
        }
    }

    /// An empty block shaped like `schema`.
    pub fn for_schema(schema: &super::Schema) -> Self {
        Self::new(schema.labels.len(), schema.dense.len(), schema.fields.len())
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    pub fn num_dense(&self) -> usize {
        self.num_dense
    }

    pub fn num_fields(&self) -> usize {
        self.num_fields
    }

    /// Total ids over all rows and fields.
    pub fn num_ids(&self) -> usize {
        self.ids.len()
    }

    pub fn clear(&mut self) {
        self.labels.clear();
        self.dense.clear();
        self.weights.clear();
        self.ids.clear();
        self.id_weights.clear();
        self.offsets.clear();
        self.offsets.push(0);
    }

    pub fn mark(&self) -> RowMark {
        RowMark {
            labels: self.labels.len(),
            dense: self.dense.len(),
            ids: self.ids.len(),
            offsets: self.offsets.len(),
        }
    }

    /// Undoes everything pushed since `mark`.
    pub fn rollback(&mut self, mark: RowMark) {
        self.labels.truncate(mark.labels);
        self.dense.truncate(mark.dense);
        self.ids.truncate(mark.ids);
        self.id_weights.truncate(mark.ids);
        self.offsets.truncate(mark.offsets);
    }

    pub fn push_label(&mut self, v: f32) {
        self.labels.push(v);
    }

    pub fn push_dense(&mut self, v: f32) {
        self.dense.push(v);
    }

    pub fn push_id(&mut self, id: FeatureId, weight: f32) {
        self.ids.push(id);
        self.id_weights.push(weight);
    }

    /// Closes the current field: the ids pushed since the previous `end_field` belong to it.
    pub fn end_field(&mut self) {
        self.offsets.push(self.ids.len() as u32);
    }

    /// Closes the row. The caller has pushed exactly the schema's labels, dense values and
    /// fields; anything else is a bug in the parser, not bad input.
    pub fn end_row(&mut self, weight: f32) {
        let n = self.weights.len() + 1;
        assert_eq!(self.labels.len(), n * self.num_labels, "labels pushed");
        assert_eq!(self.dense.len(), n * self.num_dense, "dense pushed");
        assert_eq!(self.offsets.len(), n * self.num_fields + 1, "fields pushed");
        self.weights.push(weight);
    }

    pub fn row(&self, r: usize) -> SampleRef<'_> {
        assert!(r < self.len(), "row {r} of {}", self.len());
        SampleRef {
            block: self,
            row: r,
        }
    }

    pub fn rows(&self) -> impl ExactSizeIterator<Item = SampleRef<'_>> + '_ {
        (0..self.len()).map(move |row| SampleRef { block: self, row })
    }

    /// Appends a copy of `s` (which must have this block's shape).
    pub fn push_row(&mut self, s: SampleRef<'_>) {
        self.labels.extend_from_slice(s.labels());
        self.dense.extend_from_slice(s.dense());
        for f in 0..self.num_fields {
            let (ids, w) = s.field(f);
            self.ids.extend_from_slice(ids);
            self.id_weights.extend_from_slice(w);
            self.end_field();
        }
        self.end_row(s.weight());
    }

    /// The CTR label (label 0) of every row.
    pub fn ctr_labels(&self) -> impl Iterator<Item = f32> + '_ {
        self.labels.iter().step_by(self.num_labels.max(1)).copied()
    }
}

/// One row of a [`SampleBlock`].
#[derive(Clone, Copy, Debug)]
pub struct SampleRef<'a> {
    block: &'a SampleBlock,
    row: usize,
}

impl<'a> SampleRef<'a> {
    pub fn labels(&self) -> &'a [f32] {
        let n = self.block.num_labels;
        &self.block.labels[self.row * n..(self.row + 1) * n]
    }

    /// The CTR label.
    pub fn label(&self) -> f32 {
        self.labels()[0]
    }

    pub fn dense(&self) -> &'a [f32] {
        let n = self.block.num_dense;
        &self.block.dense[self.row * n..(self.row + 1) * n]
    }

    /// Field `f`'s ids and their weights.
    pub fn field(&self, f: usize) -> (&'a [FeatureId], &'a [f32]) {
        let i = self.row * self.block.num_fields + f;
        let (a, b) = (
            self.block.offsets[i] as usize,
            self.block.offsets[i + 1] as usize,
        );
        (&self.block.ids[a..b], &self.block.id_weights[a..b])
    }

    pub fn weight(&self) -> f32 {
        self.block.weights[self.row]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_rollback() {
        let mut b = SampleBlock::new(1, 2, 2);
        b.push_label(1.0);
        b.push_dense(0.5);
        b.push_dense(-1.0);
        b.push_id(7, 1.0);
        b.push_id(8, 0.5);
        b.end_field();
        b.end_field();
        b.end_row(2.0);
        let m = b.mark();
        b.push_label(0.0);
        b.push_dense(3.0);
        b.push_id(9, 1.0);
        b.end_field();
        b.rollback(m);
        assert_eq!(b.len(), 1);
        let r = b.row(0);
        assert_eq!(r.label(), 1.0);
        assert_eq!(r.dense(), &[0.5, -1.0]);
        assert_eq!(r.field(0), (&[7u64, 8][..], &[1.0f32, 0.5][..]));
        assert_eq!(r.field(1).0.len(), 0);
        assert_eq!(r.weight(), 2.0);
        let mut c = SampleBlock::new(1, 2, 2);
        c.push_row(r);
        assert_eq!(c, b);
    }
}
