//! The embedding engine: dynamic, collision-free tables of a shard.
//!
//! - [`Table`]: one table (index, arenas, optimizer, admission, eviction, change tracking,
//!   tiering, snapshot).
//! - [`EmbeddingShard`]: the named tables one ShardOwner owns.
//!
//! Plain synchronous Rust: no actors, no async, no clocks. Time arrives in [`TrainCtx`], so
//! every test controls it and every run can be replayed.

mod admission;
mod arena;
pub mod bench;
pub mod columns;
pub mod config;
mod index;
mod mem;
mod optimizer;
pub mod snapshot;
mod stats;
mod table;
mod tier;
#[cfg(feature = "tier-compare")]
pub mod tier_compare;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use admission::AdmissionSnapshot;
pub use config::{
    AdmissionConfig, CapacityPolicy, EvictionConfig, Initializer, InvalidValue, OptimizerConfig,
    TableConfig,
};
pub(crate) use mem::huge_zeroed_vec;
pub use snapshot::{
    RowBlock, RowSource, ShardDelta, ShardSnapshot, SliceRows, TableDelta, TableSnapshot,
};
pub use stats::TableStats;
pub use table::{ApplyReport, Changes, Table};

use crate::ids::{ShardId, TableName};

/// Why a row block, snapshot or delta cannot be used. Everything read from disk or network is
/// checked before any of it is used; the message names what does not fit.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The data contradicts itself: columns of different lengths, floats missing or not
    /// finite, metadata that does not decode.
    #[error("{0}")]
    Malformed(String),
    /// Well-formed, but made for another table or shard layout: another admission policy,
    /// shape or filter size.
    #[error("{0}")]
    Mismatch(String),
    /// The source of a streamed restore failed: a read, or the checksum over what it gave.
    #[error("{0}")]
    Source(String),
}

/// The clock of a training call: the global step and wall time, passed in rather than read,
/// so that eviction by age is deterministic and testable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainCtx {
    pub step: u64,
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
}

impl TrainCtx {
    pub fn at_step(step: u64) -> Self {
        Self { step, now_ms: 0 }
    }

    pub fn now_secs(&self) -> u32 {
        (self.now_ms / 1000) as u32
    }
}

/// Errors of the embedding engine. Callers act on the case: an unknown table is a caller bug, a
/// bad gradient is the model's, a compacted change log asks for a full snapshot, and a tier
/// error is the disk's.
#[derive(Debug, Error)]
pub enum EmbeddingError {
    #[error("unknown embedding table `{0}`")]
    UnknownTable(TableName),
    #[error("table `{table}`: gradient block has {got} floats for {keys} keys of dim {dim}")]
    GradientShape {
        table: TableName,
        keys: usize,
        dim: usize,
        got: usize,
    },
    #[error("table `{table}`: changes before version {floor} were compacted (asked for changes since {since}); take a full snapshot")]
    ChangesCompacted {
        table: TableName,
        since: u64,
        floor: u64,
    },
    #[error("table `{table}`: snapshot does not fit: {reason}")]
    SnapshotMismatch { table: TableName, reason: String },
    #[error(
        "shard snapshot is for shard {got} of {got_count}, this is shard {want} of {want_count}"
    )]
    WrongShard {
        got: ShardId,
        got_count: u32,
        want: ShardId,
        want_count: u32,
    },
    #[error(transparent)]
    Config(#[from] InvalidValue),
    #[error("table `{table}`: on-disk tier: {source}")]
    Tier {
        table: TableName,
        #[source]
        source: std::io::Error,
    },
    /// The source a shard was restoring from failed after its rows were read (a checksum
    /// mismatch at the end of a file); the shard was left as it was.
    #[error("shard {shard}: restore refused: {reason}")]
    Restore { shard: ShardId, reason: String },
    /// A shard on another node failed with an error that has no typed form on the wire (a
    /// configuration or disk error there); the text is the remote error's message.
    #[error("{0}")]
    Remote(String),
    /// The owner could not be reached: its node is down or its session lost. A shard handle
    /// reports it as [`crate::shard::ShardError::Unavailable`].
    #[error("unreachable: {0}")]
    Unreachable(String),
}

/// The tables one shard owns: one [`Table`] per configured name.
#[derive(Debug)]
pub struct EmbeddingShard {
    id: ShardId,
    shard_count: u32,
    tables: Vec<Table>,
    spill_dir: Option<PathBuf>,
}

impl EmbeddingShard {
    /// `spill_dir` is this shard's own directory for the on-disk tier.
    pub fn new(
        id: ShardId,
        shard_count: u32,
        tables: &[(TableName, TableConfig)],
        spill_dir: Option<&Path>,
    ) -> Result<Self, EmbeddingError> {
        let mut built = Vec::with_capacity(tables.len());
        for (name, cfg) in tables {
            built.push(Table::new(name.clone(), cfg.clone(), spill_dir)?);
        }
        Ok(Self {
            id,
            shard_count,
            tables: built,
            spill_dir: spill_dir.map(Path::to_owned),
        })
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    /// Shards the key space is split into (this one among them).
    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn spill_dir(&self) -> Option<&Path> {
        self.spill_dir.as_deref()
    }

    pub fn table(&self, name: &TableName) -> Result<&Table, EmbeddingError> {
        self.tables
            .iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| EmbeddingError::UnknownTable(name.clone()))
    }

    pub fn table_mut(&mut self, name: &TableName) -> Result<&mut Table, EmbeddingError> {
        self.tables
            .iter_mut()
            .find(|t| t.name() == name)
            .ok_or_else(|| EmbeddingError::UnknownTable(name.clone()))
    }

    pub fn tables(&self) -> impl Iterator<Item = &Table> {
        self.tables.iter()
    }

    pub fn stats(&self) -> Vec<(TableName, TableStats)> {
        self.tables
            .iter()
            .map(|t| (t.name().clone(), t.stats()))
            .collect()
    }

    pub fn snapshot(&mut self) -> Result<ShardSnapshot, EmbeddingError> {
        let mut tables = Vec::with_capacity(self.tables.len());
        for t in &mut self.tables {
            tables.push(t.snapshot()?);
        }
        Ok(ShardSnapshot {
            shard: self.id,
            shard_count: self.shard_count,
            tables,
        })
    }

    /// Every table's changes after the versions in `since` (by table name; a table not
    /// listed is taken from version 0, i.e. whole).
    pub fn delta_since(
        &mut self,
        since: &[(TableName, u64)],
    ) -> Result<ShardDelta, EmbeddingError> {
        let mut tables = Vec::with_capacity(self.tables.len());
        for t in &mut self.tables {
            let v = since
                .iter()
                .find(|(n, _)| n == t.name())
                .map_or(0, |&(_, v)| v);
            tables.push(t.delta_since(v)?);
        }
        Ok(ShardDelta {
            shard: self.id,
            shard_count: self.shard_count,
            tables,
        })
    }

    /// Forgets every table's change history up to the versions in `through`: a durable
    /// checkpoint holds them now.
    pub fn forget_changes_through(&mut self, through: &[(TableName, u64)]) {
        for t in &mut self.tables {
            if let Some(&(_, v)) = through.iter().find(|(n, _)| n == t.name()) {
                t.forget_changes_through(v);
            }
        }
    }

    /// Restores every table from a snapshot of this same shard. All tables are checked before
    /// any is replaced, so a refused snapshot leaves the shard as it was.
    pub fn restore(&mut self, snap: ShardSnapshot) -> Result<(), EmbeddingError> {
        self.tables = self.rebuild(snap, |t, ts| t.restore(ts))?;
        Ok(())
    }

    /// Restores every table from `header` (a snapshot of this shard whose float blocks are
    /// empty), taking the rows' floats from `rows` in the header's table order. `rows.finish()`
    /// is asked before any table is replaced: a source that fails it (a checksum mismatch at
    /// the end of a file) leaves the shard as it was.
    pub fn restore_from(
        &mut self,
        header: ShardSnapshot,
        rows: &mut dyn RowSource,
    ) -> Result<(), EmbeddingError> {
        let fresh = self.rebuild(header, |t, ts| t.restore_from(ts, rows))?;
        rows.finish().map_err(|e| EmbeddingError::Restore {
            shard: self.id,
            reason: e.to_string(),
        })?;
        self.tables = fresh;
        Ok(())
    }

    /// A fresh table per snapshot table, each built by `build`, for the caller to swap in:
    /// nothing live changes here, so a refused snapshot leaves the shard as it was.
    fn rebuild(
        &self,
        snap: ShardSnapshot,
        mut build: impl FnMut(&mut Table, TableSnapshot) -> Result<(), EmbeddingError>,
    ) -> Result<Vec<Table>, EmbeddingError> {
        if snap.shard != self.id || snap.shard_count != self.shard_count {
            return Err(EmbeddingError::WrongShard {
                got: snap.shard,
                got_count: snap.shard_count,
                want: self.id,
                want_count: self.shard_count,
            });
        }
        for ts in &snap.tables {
            self.table(&ts.name)?;
        }
        for t in &self.tables {
            if !snap.tables.iter().any(|ts| ts.name == *t.name()) {
                return Err(EmbeddingError::SnapshotMismatch {
                    table: t.name().clone(),
                    reason: "the snapshot has no such table".into(),
                });
            }
        }
        let mut fresh = Vec::with_capacity(self.tables.len());
        for ts in snap.tables {
            let old = self.table(&ts.name)?;
            let mut t = Table::new(
                old.name().clone(),
                old.config().clone(),
                self.spill_dir.as_deref(),
            )?;
            build(&mut t, ts)?;
            fresh.push(t);
        }
        Ok(fresh)
    }
}
