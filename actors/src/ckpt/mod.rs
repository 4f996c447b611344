//! Checkpoints: the model as a chain of versions on disk.
//!
//! A full version holds every shard's snapshot and the dense state; a delta holds the rows
//! changed since its parent, tombstones for rows removed, the whole dense state and the
//! offsets. Each version records exactly which samples it has seen, so that rollback, replay,
//! calibration and serving all start from a known point.
//!
//! - [`store`]: the on-disk store: atomic writes, verification, restore (into any number of
//!   shards), retention with pins, serving export.
//! - [`merge`]: the pure part of restore: deltas applied to snapshots, re-sharding.
//! - [`writer`]: the CheckpointWriter actor, which captures versions at training-step
//!   boundaries and announces them.
//!
//! The format is documented in `docs/model-store.md`.

pub mod merge;
mod shard_file;
pub mod store;
pub mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::dense::ModelConfig;
use crate::embedding::TableConfig;
use crate::ids::{ShardId, TableName};
use crate::sample::Schema;

pub use store::{load_serving, ModelStore, Payload, Restored};

pub const FORMAT: &str = "freshet-model-store";
/// Version 3 seals every manifest with a checksum of its own text. Version 2 wrote full shard
/// files with their float blocks outside the msgpack header (`shard_file.rs`); version 1 wrote
/// each as one msgpack value. All three are read.
pub const FORMAT_VERSION: u32 = 3;
/// The first format version whose manifests must carry a checksum.
pub const CHECKSUMMED_FORMAT_VERSION: u32 = 3;
/// The oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// What the store can fail with. Callers act on `Corrupt`/`Missing` (pick an older version)
/// differently from `Io` (the disk).
#[derive(Debug, Error)]
pub enum CkptError {
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is missing")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("version {version} cannot be restored: {reason}")]
    Chain { version: u64, reason: String },
    #[error("no version in {store} restores ({tried} tried)")]
    NoGoodVersion { store: PathBuf, tried: usize },
    #[error("{0}")]
    Invalid(String),
}

impl CkptError {
    /// Whether the version itself is at fault (a file missing or corrupt, a broken chain),
    /// not the disk or the caller: such a version is set aside, and an older one used.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            CkptError::Corrupt { .. } | CkptError::Missing { .. } | CkptError::Chain { .. }
        )
    }
}

/// A version set aside by [`ModelStore::quarantine`]: kept, never read as a version again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    pub version: u64,
    /// Where it now lies.
    pub dir: PathBuf,
    /// Why: the error that refused it, with the file and the checksums it names.
    pub reason: String,
    pub at_unix_ms: u64,
}

/// An I/O error on `path`, with a missing file told apart: restore falls back on it.
pub(crate) fn io(path: &std::path::Path, e: std::io::Error) -> CkptError {
    if e.kind() == std::io::ErrorKind::NotFound {
        CkptError::Missing {
            path: path.to_path_buf(),
        }
    } else {
        CkptError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionKind {
    Full,
    Delta,
    /// A serving export: weights only, outside the store's chain.
    Serving,
}

/// One version of a store as it travels to another node's mirror: the text of its manifest
/// and its files by name. [`ModelStore::import_version`] checks all of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionFiles {
    pub version: u64,
    /// `manifest.json` as the store holds it, sealed with its checksum.
    #[serde(with = "crate::event::serde_bytes_compat")]
    pub manifest: Vec<u8>,
    pub files: Vec<VersionFile>,
}

/// One data file of a [`VersionFiles`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionFile {
    pub name: String,
    #[serde(with = "crate::event::serde_bytes_compat")]
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub crc32c: u32,
}

/// The validator's verdict on a version, filled in after it is written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub passed: bool,
    pub samples: u64,
    /// Metric name -> value (auc, logloss, calibration, ...).
    pub metrics: BTreeMap<String, f64>,
    pub at_unix_ms: u64,
    /// Which gate failed, if one did.
    pub reason: Option<String>,
}

/// A version's manifest: `manifest.json` in its directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub version: u64,
    pub parent: Option<u64>,
    /// The full version this version's chain starts from (itself for a full version).
    pub base: u64,
    pub kind: VersionKind,
    pub created_unix_ms: u64,
    /// Training steps taken at this version.
    pub step: u64,
    pub rows_trained: u64,
    /// Sample-log partition -> the next offset to consume: every sample before it is in this
    /// version, none after it.
    pub sample_offsets: BTreeMap<u32, u64>,
    /// Event topic -> partition -> the joiner's next offset.
    pub joiner_offsets: BTreeMap<String, BTreeMap<u32, u64>>,
    pub validation: Option<Validation>,
    /// Samples read from the sample log but refused (undecodable, or outside the schema) and
    /// dead-lettered. With `rows_trained` they account for every consumed offset.
    #[serde(default)]
    pub samples_rejected: u64,
    /// Replays the trainer ran since the previous version, with the ranges they skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<ReplayRecord>,
    /// Set when a rollback to an older version made this one history: kept, never served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RolledBack>,
    /// Set on the version a calibration installed: the base model it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated_from: Option<CalibrationSource>,
    pub model: ModelConfig,
    pub schema: Schema,
    pub tables: BTreeMap<String, TableConfig>,
    pub shards: u32,
    /// Where the shards ran (a cluster's placement and its epoch); none in one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<ShardPlacement>,
    /// Every data file of this version: size and CRC32C (Castagnoli).
    pub files: BTreeMap<String, FileSum>,
    /// CRC32C of this manifest's own text with this field's value written as 0. It is the
    /// last field, so that a reader can find it in the text; `None` in memory (the store
    /// seals a manifest as it writes it and checks and clears the seal as it reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<u32>,
}

impl Manifest {
    /// Bytes of this version's data files.
    pub fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }
}

/// A replay of sample-log offsets `[from, to)` of one partition, without `skip` when given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRecord {
    pub partition: u32,
    pub from: u64,
    pub to: u64,
    /// The sub-range `[start, end)` left out.
    pub skip: Option<(u64, u64)>,
    /// Samples trained by the replay (refused ones excluded).
    pub rows: u64,
}

/// Why a version is history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// The version the rollback went back to.
    pub to: u64,
    pub at_unix_ms: u64,
}

/// The base model a calibration installed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationSource {
    pub store: PathBuf,
    pub version: u64,
}

/// Where the shard owners ran when a version was taken: the cluster's placement and its
/// epoch. A version trained in one process has none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlacement {
    pub epoch: u64,
    /// `nodes[i]`: the id of the node that hosted shard `i`.
    pub nodes: Vec<String>,
}

/// What the caller knows of a version besides its state: the step, the offsets, the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionMeta {
    pub step: u64,
    pub rows_trained: u64,
    pub samples_rejected: u64,
    pub replays: Vec<ReplayRecord>,
    pub calibrated_from: Option<CalibrationSource>,
    pub sample_offsets: BTreeMap<u32, u64>,
    pub joiner_offsets: BTreeMap<String, BTreeMap<u32, u64>>,
    pub model: ModelConfig,
    pub schema: Schema,
    pub tables: BTreeMap<String, TableConfig>,
    /// Set by the checkpoint writer from its router when the shards run on other nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<ShardPlacement>,
}

/// One table of a serving export: keys and weights only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServingTable {
    pub name: TableName,
    pub dim: u32,
    pub keys: Vec<u64>,
    #[serde(with = "crate::embedding::snapshot::f32_bytes")]
    pub weights: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServingShard {
    pub shard: ShardId,
    pub shard_count: u32,
    pub tables: Vec<ServingTable>,
}

#[cfg(test)]
mod tests;
