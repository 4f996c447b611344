//! Snapshots of tables and shards: everything needed to rebuild them bit for bit.
//!
//! Float blocks serialize as raw little-endian bytes, not element by element: a shard holds
//! hundreds of millions of floats, and per-element encoding would cost several times the size
//! and the time.

use serde::{Deserialize, Serialize};

use super::admission::AdmissionSnapshot;
use super::stats::TableStats;
use super::SnapshotError;
use crate::ids::{ShardId, TableName};
use crate::rng::Xoshiro256;

/// Rows in columns: one entry per row in every column, `data` holding `row_floats` per row.
///
/// Serialized as two byte strings: the metadata columns packed and compressed, then the float
/// block raw ([`super::columns`] holds the encoding).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowBlock {
    pub row_ids: Vec<u32>,
    pub keys: Vec<u64>,
    pub versions: Vec<u64>,
    pub update_steps: Vec<u32>,
    pub access_steps: Vec<u32>,
    pub update_secs: Vec<u32>,
    pub freqs: Vec<u32>,
    /// Weights then optimizer state, per row.
    pub data: Vec<f32>,
}

impl RowBlock {
    pub(crate) fn with_capacity(rows: usize, row_floats: usize) -> Self {
        Self {
            row_ids: Vec::with_capacity(rows),
            keys: Vec::with_capacity(rows),
            versions: Vec::with_capacity(rows),
            update_steps: Vec::with_capacity(rows),
            access_steps: Vec::with_capacity(rows),
            update_secs: Vec::with_capacity(rows),
            freqs: Vec::with_capacity(rows),
            data: Vec::with_capacity(rows * row_floats),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push_meta(
        &mut self,
        row: u32,
        key: u64,
        version: u64,
        update_step: u32,
        access_step: u32,
        update_secs: u32,
        freq: u32,
    ) {
        self.row_ids.push(row);
        self.keys.push(key);
        self.versions.push(version);
        self.update_steps.push(update_step);
        self.access_steps.push(access_step);
        self.update_secs.push(update_secs);
        self.freqs.push(freq);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The weights and state of row `i`.
    pub fn row(&self, i: usize, row_floats: usize) -> &[f32] {
        &self.data[i * row_floats..(i + 1) * row_floats]
    }

    /// Checks that every column has one entry per row and every float is finite: a block from
    /// disk or network is checked before any of it is used.
    pub fn check(&self, row_floats: usize) -> Result<(), SnapshotError> {
        self.check_columns()?;
        let n = self.keys.len();
        if self.data.len() != n * row_floats {
            return Err(SnapshotError::Malformed(format!(
                "row block has {} floats for {n} rows of {row_floats}",
                self.data.len()
            )));
        }
        if let Some(i) = self.data.iter().position(|x| !x.is_finite()) {
            return Err(SnapshotError::Malformed(format!(
                "row block holds a non-finite value at float {i}"
            )));
        }
        Ok(())
    }

    /// The metadata columns without the floats: what a restore that streams the floats
    /// from a [`RowSource`] can check up front.
    pub fn check_columns(&self) -> Result<(), SnapshotError> {
        let n = self.keys.len();
        let cols = [
            ("row_ids", self.row_ids.len()),
            ("versions", self.versions.len()),
            ("update_steps", self.update_steps.len()),
            ("access_steps", self.access_steps.len()),
            ("update_secs", self.update_secs.len()),
            ("freqs", self.freqs.len()),
        ];
        for (name, len) in cols {
            if len != n {
                return Err(SnapshotError::Malformed(format!(
                    "row block has {n} keys but {len} {name}"
                )));
            }
        }
        Ok(())
    }

    /// The metadata columns only, `data` left empty (a header whose floats travel apart).
    pub fn without_floats(&self) -> Self {
        Self {
            row_ids: self.row_ids.clone(),
            keys: self.keys.clone(),
            versions: self.versions.clone(),
            update_steps: self.update_steps.clone(),
            access_steps: self.access_steps.clone(),
            update_secs: self.update_secs.clone(),
            freqs: self.freqs.clone(),
            data: Vec::new(),
        }
    }
}

/// Where a restore takes its rows' floats from, in the snapshot's row order and table order.
///
/// A snapshot in memory is its own source ([`SliceRows`]). The model store's full shard files
/// are another: their floats stream from disk through one small reused buffer straight into
/// the live tables, so a restore never holds a table twice in memory (under a hypervisor,
/// first-touching fresh memory can cost more than reading the disk; see
/// `docs/design-notes.md`).
pub trait RowSource {
    /// The next `floats` floats: whole rows, `row_floats` each, of the table being restored.
    fn next_floats(&mut self, floats: usize) -> Result<&[f32], SnapshotError>;

    /// Called once every table has taken its rows, before any restored table replaces a live
    /// one: a source that checks a checksum over everything it gave says here whether the
    /// rows were good.
    fn finish(&mut self) -> Result<(), SnapshotError> {
        Ok(())
    }
}

/// A float block in memory as a [`RowSource`].
#[derive(Debug)]
pub struct SliceRows<'a> {
    data: &'a [f32],
}

impl<'a> SliceRows<'a> {
    pub fn new(data: &'a [f32]) -> Self {
        Self { data }
    }
}

impl RowSource for SliceRows<'_> {
    fn next_floats(&mut self, floats: usize) -> Result<&[f32], SnapshotError> {
        if floats > self.data.len() {
            return Err(SnapshotError::Malformed(format!(
                "the row block ends {} floats short",
                floats - self.data.len()
            )));
        }
        let (head, rest) = self.data.split_at(floats);
        self.data = rest;
        Ok(head)
    }
}

/// One table of one shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableSnapshot {
    pub name: TableName,
    pub dim: u32,
    pub optimizer: String,
    pub row_floats: u32,
    pub version: u64,
    pub next_row: u32,
    pub free_rows: Vec<u32>,
    pub rows: RowBlock,
    pub admission: AdmissionSnapshot,
    pub sampler: Xoshiro256,
    pub sweep_cursor: u32,
    pub stats: TableStats,
}

impl TableSnapshot {
    /// Everything but the float block (`rows.data` left empty).
    pub fn without_floats(&self) -> Self {
        Self {
            name: self.name.clone(),
            dim: self.dim,
            optimizer: self.optimizer.clone(),
            row_floats: self.row_floats,
            version: self.version,
            next_row: self.next_row,
            free_rows: self.free_rows.clone(),
            rows: self.rows.without_floats(),
            admission: self.admission.clone(),
            sampler: self.sampler.clone(),
            sweep_cursor: self.sweep_cursor,
            stats: self.stats.clone(),
        }
    }

    /// Rows as (key, data) sorted by key: the comparable form, independent of row ids.
    pub fn rows_by_key(&self) -> Vec<(u64, &[f32])> {
        let rf = self.row_floats as usize;
        let mut v: Vec<(u64, &[f32])> = (0..self.rows.len())
            .map(|i| (self.rows.keys[i], self.rows.row(i, rf)))
            .collect();
        v.sort_unstable_by_key(|r| r.0);
        v
    }
}

/// What changed in one table of one shard after version `since`: with the snapshot (or
/// restored state) at `since`, exactly the state at `version`. Rows changed and keys
/// deleted cost in proportion to the changes; the table's small state (row-id allocation,
/// pending admission, sampler, counters) travels whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableDelta {
    pub name: TableName,
    pub dim: u32,
    pub optimizer: String,
    pub row_floats: u32,
    pub since: u64,
    pub version: u64,
    pub upserts: RowBlock,
    pub tombstones: Vec<u64>,
    pub next_row: u32,
    pub free_rows: Vec<u32>,
    pub admission: AdmissionSnapshot,
    pub sampler: Xoshiro256,
    pub sweep_cursor: u32,
    pub stats: TableStats,
}

/// Every table's delta of one shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardDelta {
    pub shard: ShardId,
    pub shard_count: u32,
    pub tables: Vec<TableDelta>,
}

impl ShardDelta {
    /// Each table's version after this delta.
    pub fn table_versions(&self) -> Vec<(TableName, u64)> {
        self.tables
            .iter()
            .map(|t| (t.name.clone(), t.version))
            .collect()
    }
}

/// Every table of one shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardSnapshot {
    pub shard: ShardId,
    pub shard_count: u32,
    pub tables: Vec<TableSnapshot>,
}

impl ShardSnapshot {
    /// Each table's version in this snapshot.
    pub fn table_versions(&self) -> Vec<(TableName, u64)> {
        self.tables
            .iter()
            .map(|t| (t.name.clone(), t.version))
            .collect()
    }
}

/// Serde for `Vec<f32>` as one byte string of little-endian floats.
pub mod f32_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        if cfg!(target_endian = "little") {
            s.serialize_bytes(bytemuck::cast_slice(v))
        } else {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            s.serialize_bytes(&bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<f32>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string of little-endian f32")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Vec<f32>, E> {
                if !b.len().is_multiple_of(4) {
                    return Err(E::custom(format!(
                        "f32 block of {} bytes is not a multiple of 4",
                        b.len()
                    )));
                }
                // Restore decodes hundreds of megabytes here: into huge pages, by memcpy.
                let mut v = crate::embedding::huge_zeroed_vec::<f32>(b.len() / 4);
                if cfg!(target_endian = "little") {
                    bytemuck::cast_slice_mut::<f32, u8>(&mut v).copy_from_slice(b);
                } else {
                    for (x, c) in v.iter_mut().zip(b.chunks_exact(4)) {
                        *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                Ok(v)
            }
            fn visit_byte_buf<E: serde::de::Error>(self, b: Vec<u8>) -> Result<Vec<f32>, E> {
                self.visit_bytes(&b)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<f32>, A::Error> {
                // Formats without a byte type (JSON) write bytes as a sequence of numbers.
                let mut bytes = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                self.visit_bytes(&bytes)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Serde for `Vec<u8>` as one byte string (msgpack `bin`), not a sequence of numbers.
pub mod byte_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
                Ok(b.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, b: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(b)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut bytes = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                Ok(bytes)
            }
        }
        d.deserialize_bytes(V)
    }
}
